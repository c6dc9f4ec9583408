"""How each layer updates the residual stream: sizes, directions, dilution, and tokenwise structure.

For block ``l`` with input ``h = resid_pre[l]`` and output ``h' = resid_post[l]``, the update is
``u = h' - h`` (``= attn_out + mlp_out`` on every architecture the site map supports). Per token:

- ``update_norm`` ``||u||``; ``relative_update`` ``||u|| / ||h||``;
- ``update_cosine`` ``cos(u, h)`` (negative: the layer erases part of what is there);
- ``norm_change`` ``||h'|| / ||h||`` and ``direction_change`` ``1 - cos(h, h')``.

Norm growth and dilution ("Attention Residuals"): in PreNorm models ``||h||`` grows with depth,
so each layer's *relative* contribution ``||u|| / ||h'||`` shrinks. :func:`depth_profile`
reports the per-layer medians separately for sink tokens (residual-norm peaks, Guo et al. 2024)
and for the rest, because a handful of sink tokens with 100x norms would otherwise set the scale.

Tokenwise structure ("On the Geometric Structure of Layer Updates in Deep Language Models"):
the update is dominated by a function of each token's own state. :func:`tokenwise_fit` fits
``u ~ W f(h) + b`` (``f(h)``: the token's direction, as its PreNorm block reads it; ridge least
squares, float64) and a rank-``r`` restriction of it (reduced-rank
regression: the full fit projected onto the top-``r`` principal directions of its fitted values)
on the tokens of training prompts, and scores held-out prompts: R^2, mean cosine between fitted
and true update, relative size of what the fit leaves. :func:`fit_residual_effect` (a fresh
forward pass per layer, through :mod:`workbench.probes.hooks`) replaces the layer's update by
the fit and correlates, per layer, the size of each token's leftover ``||u - fit(h)||`` with how
much its output distribution changes (KL, Spearman's rho via scipy).

Dims: a run with ``resid_pre`` and ``resid_post`` (sample, pos, layer, d_model) -> (sample, pos, layer).
Everything here works on lazily opened (dask-backed) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..numerics import kl_from_logprobs
from ..probes import hooks
from ..probes.sites import RESID_POST, RESID_PRE
from .common import require
from .residual_norms import residual_norms


def _norm(x: xr.DataArray) -> xr.DataArray:
    return (x.astype("float64") ** 2).sum("d_model", skipna=False) ** 0.5


def update_statistics(run: xr.Dataset) -> xr.Dataset:
    """Per (sample, pos, layer): the update's size and direction relative to the residual it joins.

    Computed one layer at a time (float64), so memory stays at a few copies of one layer's residual.
    """
    pre, post_all = require(run, "resid_pre"), require(run, "resid_post")
    layers = []
    for layer in range(run.sizes["layer"]):
        h, post = pre.isel(layer=layer).astype("float64"), post_all.isel(layer=layer).astype("float64")
        u = post - h
        h_norm, post_norm, u_norm = _norm(h), _norm(post), _norm(u)
        layers.append(xr.Dataset({
            "residual_norm": h_norm,
            "update_norm": u_norm,
            "relative_update": u_norm / h_norm,
            "update_cosine": (u * h).sum("d_model") / (u_norm * h_norm),
            "norm_change": post_norm / h_norm,
            "direction_change": 1 - (h * post).sum("d_model") / (h_norm * post_norm),
            "contribution": u_norm / post_norm,
        }).compute())
    out = xr.concat(layers, "layer").transpose("sample", "pos", "layer").where(run["valid"])
    for name, text in [("residual_norm", "||h_l||"), ("update_norm", "||u_l||, u = resid_post - resid_pre"),
                       ("relative_update", "||u_l|| / ||h_l||"), ("update_cosine", "cos(u_l, h_l)"),
                       ("norm_change", "||h_l + u_l|| / ||h_l||"), ("direction_change", "1 - cos(h_l, h_l + u_l)"),
                       ("contribution", "||u_l|| / ||h_l + u_l|| (relative contribution)")]:
        out[name].attrs["long_name"] = text
    out.attrs["analysis"] = "layer_updates.update_statistics"
    return out


def sink_tokens(run: xr.Dataset, min_ratio: float = 10.0) -> xr.DataArray:
    """(sample, pos) True where the residual norm reaches ``min_ratio`` x the sample's median at some layer."""
    norms = residual_norms(run)
    ratio = norms / norms.median("pos", skipna=True)
    return (ratio.max("layer") >= min_ratio).where(run["valid"], False).rename("sink")


def depth_profile(stats: xr.Dataset, sinks: xr.DataArray) -> xr.Dataset:
    """Per-layer medians of every statistic, for sink tokens and for the rest (dim ``tokens``)."""
    names = [n for n in stats.data_vars if {"sample", "pos", "layer"} <= set(stats[n].dims)]
    parts = []
    for label, mask in (("other", ~sinks), ("sink", sinks)):
        stacked = stats[names].where(mask).stack(token=("sample", "pos"))
        parts.append(stacked.median("token", skipna=True).expand_dims(tokens=[label]))
    profile = xr.concat(parts, "tokens").compute()
    profile["n_tokens"] = ("tokens", [int((~sinks & stats["residual_norm"].isel(layer=0).notnull()).sum()),
                                      int(sinks.sum())])
    profile.attrs.update(analysis="layer_updates.depth_profile", statistic="median over tokens")
    return profile


# --------------------------------------------------------------------------- tokenwise structure


def _features(h, normalize: bool):
    """What the fit reads of each token's state: ``h`` itself, or its direction ``sqrt(d) h / ||h||`` (what a
    PreNorm block's RMSNorm passes on, up to the norm's gain, which the linear map absorbs)."""
    if not normalize:
        return h
    norm = (h * h).sum(-1, keepdims=True) ** 0.5
    return h * (h.shape[-1] ** 0.5) / norm


@dataclass
class TokenwiseFit:
    """Per-layer affine maps ``u ~ features(h) @ weight[l] + bias[l]`` (float64), one per fitted rank."""

    weight: dict  # (rank label, layer) -> (d_model, d_model)
    bias: dict  # (rank label, layer) -> (d_model,)
    normalize: bool = False

    def predict(self, label: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(self.weight[label, layer], dtype=torch.float64, device=h.device)
        b = torch.as_tensor(self.bias[label, layer], dtype=torch.float64, device=h.device)
        return (_features(h.double(), self.normalize) @ w + b).to(h.dtype)


def _tokens(run: xr.Dataset, samples, layer: int, exclude: xr.DataArray | None):
    """(tokens, d) arrays of h and u at ``layer`` for the valid, non-excluded tokens of ``samples``."""
    sub = run.isel(sample=samples, layer=layer)
    keep = sub["valid"].values.copy()
    if exclude is not None:
        keep &= ~exclude.isel(sample=samples).values
    h = np.asarray(sub["resid_pre"].transpose("sample", "pos", "d_model").values, np.float64)[keep]
    post = np.asarray(sub["resid_post"].transpose("sample", "pos", "d_model").values, np.float64)[keep]
    return h, post - h


def _r2(true: np.ndarray, pred: np.ndarray) -> float:
    return float(1 - ((true - pred) ** 2).sum() / ((true - true.mean(0)) ** 2).sum())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-300)


def tokenwise_fit(run: xr.Dataset, *, ranks=(8, 32), ridge: float = 1e-3, train_fraction: float = 0.75,
                  seed: int = 0, exclude: xr.DataArray | None = None, layers=None, normalize: bool = True,
                  progress: bool = True) -> tuple[xr.Dataset, TokenwiseFit]:
    """Fit ``u_l ~ W f(h_l) + b`` (full rank and each of ``ranks``) per layer on training prompts; score held-out prompts.

    ``normalize=True``: ``f(h)`` is the token's direction ``sqrt(d) h / ||h||``, the input every PreNorm
    block actually reads (a map linear in it is still a function of the token's own state alone);
    ``False``: ``f(h) = h``.
    Prompts, not tokens, are split (seeded), so no held-out token shares a context with a training
    token; the held-out samples are listed in ``attrs["test_samples"]``.
    ``exclude`` (sample, pos): tokens left out of fit and score (e.g. :func:`sink_tokens`).
    ``ridge`` is relative: it is multiplied by the mean eigenvalue of the centred features' Gram matrix.
    Returns per (layer, fit): ``r2``, ``alignment`` (mean cosine of fitted and true update),
    ``leftover`` (median ``||u - fit|| / ||u||``), and the fitted maps.
    """
    require(run, "resid_pre"), require(run, "resid_post")
    n = run.sizes["sample"]
    if n < 2:
        raise ValueError("tokenwise_fit needs at least 2 prompts (some to fit on, some held out).")
    layers = list(range(run.sizes["layer"])) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < run.sizes["layer"]]
    if bad:
        raise IndexError(f"layers {bad} out of range: the run has layers 0..{run.sizes['layer'] - 1}.")
    d = run.sizes["d_model"]
    if any(not 1 <= r <= d for r in ranks):
        raise ValueError(f"ranks must lie in 1..d_model={d}, got {list(ranks)}.")
    order = np.random.default_rng(seed).permutation(n)
    n_train = min(n - 1, max(1, int(round(train_fraction * n))))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    labels = ["full"] + [f"rank {r}" for r in ranks]
    metrics = np.full((len(layers), len(labels), 3), np.nan)
    fit = TokenwiseFit({}, {}, normalize)
    for i, layer in enumerate(tqdm(layers, desc="tokenwise fit", disable=not progress)):
        h, u = _tokens(run, train, layer, exclude)
        h = _features(h, normalize)
        h_mean, u_mean = h.mean(0), u.mean(0)
        hc, uc = h - h_mean, u - u_mean
        gram = hc.T @ hc
        gram[np.diag_indices(d)] += ridge * np.trace(gram) / d
        w_full = np.linalg.solve(gram, hc.T @ uc)
        # reduced-rank regression: project the fit onto the top principal directions of its fitted values
        _, _, vt = np.linalg.svd(hc @ w_full, full_matrices=False)
        h_test, u_test = _tokens(run, test, layer, exclude)
        h_test = _features(h_test, normalize)
        for j, label in enumerate(labels):
            w = w_full if label == "full" else w_full @ vt[: ranks[j - 1]].T @ vt[: ranks[j - 1]]
            b = u_mean - h_mean @ w
            fit.weight[label, layer], fit.bias[label, layer] = w, b
            pred = h_test @ w + b
            left = np.linalg.norm(u_test - pred, axis=-1) / np.linalg.norm(u_test, axis=-1)
            metrics[i, j] = _r2(u_test, pred), _cosine(pred, u_test).mean(), np.median(left)
    ds = xr.Dataset(
        {name: (("layer", "fit"), metrics[..., k]) for k, name in enumerate(["r2", "alignment", "leftover"])},
        coords={"layer": layers, "fit": labels},
        attrs={"analysis": "layer_updates.tokenwise_fit", "ridge": ridge, "train_prompts": len(train),
               "test_prompts": len(test), "test_samples": [int(i) for i in test], "seed": seed,
               "features": "direction" if normalize else "state",
               "excluded_tokens": int(exclude.sum()) if exclude is not None else 0},
    )
    ds["r2"].attrs["long_name"] = "held-out R^2 of the update"
    ds["alignment"].attrs["long_name"] = "mean cos(fit, update), held-out tokens"
    ds["leftover"].attrs["long_name"] = "median ||u - fit|| / ||u||, held-out tokens"
    return ds, fit


def fit_residual_effect(handle, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, fit: TokenwiseFit,
                        label: str = "full", layers=None, skip_first: int = 1, progress: bool = True) -> xr.Dataset:
    """Replace layer ``l``'s update by its tokenwise fit; per layer, Spearman(||u - fit||, KL(orig || replaced)) over tokens.

    One forward pass per layer (the original pass's states are read in the same pass, before the
    edit). The first ``skip_first`` positions (the sink) are left out of the correlation.
    """
    layers = sorted({l for (lab, l) in fit.weight if lab == label}) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"the fit has no layers for {label!r}; fitted: {sorted({lab for lab, _ in fit.weight})}.")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    keep = mask.clone()
    keep[:, :skip_first] = False
    keep = keep.cpu()
    base = torch.log_softmax(hooks.forward(handle, input_ids, attention_mask).logits.float(), -1)
    rho, p_value, kl_mean, left_mean = [], [], [], []
    for layer in tqdm(layers, desc="replace update by fit", disable=not progress):
        seen = {}

        def read(site, l, value):
            seen[site] = value

        def replace(post, layer=layer):
            h = seen[RESID_PRE]
            return h + fit.predict(label, layer, h)

        out = hooks.forward(handle, input_ids, attention_mask, reads=[(RESID_PRE, layer), (RESID_POST, layer)],
                            on_site=read, edits={(RESID_POST, layer): replace})
        logq = torch.log_softmax(out.logits.float(), -1)
        kl = kl_from_logprobs(base, logq).clamp_min(0).cpu()[keep].numpy()
        h, post = seen[RESID_PRE].double(), seen[RESID_POST].double()
        left = (post - h - fit.predict(label, layer, h).double()).norm(dim=-1).cpu()[keep].numpy()
        r = spearmanr(left, kl)
        rho.append(float(r.statistic)), p_value.append(float(r.pvalue))
        kl_mean.append(float(kl.mean())), left_mean.append(float(left.mean()))
    return xr.Dataset(
        {"spearman": ("layer", rho), "p_value": ("layer", p_value), "mean_kl": ("layer", kl_mean),
         "mean_leftover_norm": ("layer", left_mean)},
        coords={"layer": layers},
        attrs={"analysis": "layer_updates.fit_residual_effect", "fit": label, "tokens": int(keep.sum()),
               "forward_passes": len(layers) + 1, "model": handle.name},
    )
