"""What each layer already predicts: logit-lens and tuned-lens statistics over layer x position.

Logit lens (nostalgebraist 2020) and tuned lens (Belrose et al., "Eliciting Latent
Predictions from Transformers with the Tuned Lens", 2023); the lenses themselves are in
:mod:`workbench.probes.lens`. For block ``l``'s output ``h_l`` and lens distribution
``q_l = softmax(lens_l(h_l))``, with ``p = q_(L-1)`` the model's own output:

- ``cross_entropy`` = -log q_l(next token)  (NaN at the last token of a sample)
- ``entropy``       = -sum_v q_l(v) log q_l(v)  (nats)
- ``kl_to_final``   = KL(p || q_l) = sum_v p(v) (log p(v) - log q_l(v))
- ``final_top1_rank`` = rank of the final top-1 token under q_l (0 = the lens agrees)
- ``top_k_ids`` / ``top_k_probs``: the lens's k most likely tokens
- ``first_agreeing_layer`` (sample, pos): the first layer whose top-1 equals the final top-1.

A tuned lens is undefined (NaN, rank -1) at the positions it was not trained on (its
``skip_first_positions``: the attention-sink token), except at the last layer.

Dims: a run with ``resid_post`` (sample, pos, layer, d_model) -> (sample, pos, layer[, k]).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..models import ModelHandle
from ..numerics import kl_from_logprobs
from ..probes.lens import TunedLens, lens_logits
from .common import require


def lens_statistics(
    run: xr.Dataset, model: ModelHandle, lens: TunedLens | None = None, *, top_k: int = 5, chunk_tokens: int = 256
) -> xr.Dataset:
    """Logit-lens (``lens=None``) or tuned-lens statistics of every layer at every position of ``run``."""
    require(run, "resid_post")
    if run.attrs.get("model_file_hash") not in (None, model.file_hash):
        raise ValueError(
            f"the run was captured with {run.attrs.get('model')}, not {model.name}: open the run's own model."
        )
    if lens is not None:
        lens.check_model(model)
    n_s, n_p, n_l = run.sizes["sample"], run.sizes["pos"], run.sizes["layer"]
    resid = run["resid_post"].transpose("sample", "pos", "layer", "d_model")
    valid = run["valid"].values
    ids = run["token_id"].values
    next_ids = np.full_like(ids, -1)
    next_ids[:, :-1] = ids[:, 1:]
    where = np.argwhere(valid)  # (n, 2) real tokens only
    shape = (n_s, n_p, n_l)
    out = {name: np.full(shape, np.nan, np.float32) for name in ("cross_entropy", "entropy", "kl_to_final")}
    out["final_top1_rank"] = np.full(shape, -1, np.int64)
    top_ids = np.full(shape + (top_k,), -1, np.int64)
    top_probs = np.full(shape + (top_k,), np.nan, np.float32)
    last = n_l - 1
    with torch.no_grad():
        for start in range(0, len(where), chunk_tokens):
            s, p = where[start : start + chunk_tokens].T
            h = torch.from_numpy(np.asarray(resid.values[s, p], np.float32))  # (t, layer, d)
            final = torch.log_softmax(lens_logits(model, h[:, last]).float(), -1)
            final_top1 = final.argmax(-1)
            nxt = torch.from_numpy(next_ids[s, p])
            has_next = nxt >= 0
            for layer in range(n_l):
                if lens is None or layer == last:
                    logits = lens_logits(model, h[:, layer])
                else:
                    logits = lens.logits(model, layer, h[:, layer])
                logq = torch.log_softmax(logits.float(), -1)
                q = logq.exp()
                out["entropy"][s, p, layer] = (-(q * logq).sum(-1)).cpu().numpy()
                out["kl_to_final"][s, p, layer] = kl_from_logprobs(final, logq).clamp_min(0).cpu().numpy()
                ce = torch.full((len(s),), float("nan"))
                ce[has_next] = -logq[has_next].gather(-1, nxt[has_next, None])[:, 0].cpu()
                out["cross_entropy"][s, p, layer] = ce.numpy()
                chosen = logq.gather(-1, final_top1[:, None])
                out["final_top1_rank"][s, p, layer] = (logq > chosen).sum(-1).cpu().numpy()
                tp, ti = q.topk(top_k, -1)
                top_ids[s, p, layer], top_probs[s, p, layer] = ti.cpu().numpy(), tp.cpu().numpy()
    skip = int(lens.info.get("skip_first_positions", 0)) if lens is not None else 0
    if skip:  # the translators never saw these positions (the sink): undefined there, not extrapolated
        for name in ("cross_entropy", "entropy", "kl_to_final"):
            out[name][:, :skip, :last] = np.nan
        out["final_top1_rank"][:, :skip, :last] = -1
        top_ids[:, :skip, :last], top_probs[:, :skip, :last] = -1, np.nan
    agrees = out["final_top1_rank"] == 0
    first = np.where(agrees.any(-1), agrees.argmax(-1), -1)
    first[~valid] = -1
    dims = ("sample", "pos", "layer")
    coords = {k: v for k, v in run.coords.items() if set(v.dims) <= {"sample", "pos", "layer"}}
    coords["k"] = np.arange(top_k)
    ds = xr.Dataset(
        {
            "cross_entropy": (dims, out["cross_entropy"], {"long_name": "-log q_l(next token)", "units": "nats"}),
            "entropy": (dims, out["entropy"], {"units": "nats"}),
            "kl_to_final": (dims, out["kl_to_final"], {"long_name": "KL(p_final || q_l)", "units": "nats"}),
            "final_top1_rank": (dims, out["final_top1_rank"]),
            "top_k_ids": (dims + ("k",), top_ids),
            "top_k_probs": (dims + ("k",), top_probs),
            "first_agreeing_layer": (("sample", "pos"), first),
        },
        coords=coords,
        attrs={
            "analysis": "lens.lens_statistics",
            "lens": "logit" if lens is None else "tuned",
            "model": model.name,
            "model_file_hash": model.file_hash,
        },
    )
    if lens is not None:
        ds.attrs.update({f"tuned_lens_{k}": v for k, v in lens.info.items() if isinstance(v, (int, float, str))})
    return ds


def lens_summary(stats: xr.Dataset, skip_first: int = 1) -> xr.Dataset:
    """Token-averaged per-layer curves: mean cross-entropy, entropy, KL to final, top-1 agreement.

    The first ``skip_first`` positions (the attention-sink token, which the tuned lens is not
    trained on) are left out, so logit and tuned lens are averaged over the same tokens.
    """
    stats = stats.isel(pos=slice(skip_first, None))
    valid = stats["final_top1_rank"] >= 0
    return xr.Dataset(
        {
            "cross_entropy": stats.cross_entropy.mean(("sample", "pos")),
            "entropy": stats.entropy.where(valid).mean(("sample", "pos")),
            "kl_to_final": stats.kl_to_final.where(valid).mean(("sample", "pos")),
            "top1_agreement": (stats.final_top1_rank == 0).where(valid).mean(("sample", "pos")),
        },
        attrs=dict(stats.attrs),
    )
