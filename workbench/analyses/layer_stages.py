"""Stages of inference: what deleting one layer, or swapping two adjacent ones, does to the output.

Reproduces the sweep of "The Remarkable Robustness of LLMs: Stages of Inference?" (Lad et al.,
2024): each layer ``l`` is deleted (its block passes its input through: attention and MLP add
nothing) and each adjacent pair ``(l, l+1)`` is run in swapped order, without retraining. The
paper finds most single interventions keep 72-95% of the original top-1 predictions, except at the
first layer, and reads four stages off the depth profile (detokenisation, feature engineering,
prediction ensembling, residual sharpening).

Per intervention, averaged over the valid tokens of the prompts (``p`` original, ``q`` intervened
next-token distributions):

- ``kl``: KL(p || q) in nats; ``loss_change``: mean -log q(next) minus mean -log p(next);
- ``entropy``: mean entropy of q (nats; ``base_entropy`` is p's);
- ``top1_retention``: share of tokens whose most likely next token is unchanged.

The interventions are :func:`workbench.probes.interventions.delete_layers` and
:func:`~workbench.probes.interventions.swap_layers`; this module only runs them and scores.
Dims: -> (intervention) with coords ``kind`` (delete / swap), ``layer`` and ``relative_depth``
(a deleted block at ``(layer + 0.5) / n_layers``, between its input and output; a swapped pair at the
boundary between the two, ``(layer + 1) / n_layers``).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..numerics import entropy_from_logprobs, kl_from_logprobs
from ..probes.interventions import delete_layers, next_token_distributions, swap_layers

METRICS = ("kl", "loss_change", "entropy", "top1_retention")


def interventions(n_layers: int, layers=None, kinds=("delete", "swap")) -> list[tuple[str, int]]:
    """``(kind, layer)`` pairs: every listed layer deleted, every listed layer swapped with the next."""
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise IndexError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}.")
    unknown = set(kinds) - {"delete", "swap"}
    if unknown:
        raise ValueError(f"unknown intervention kinds {sorted(unknown)}: use 'delete' and/or 'swap'.")
    out = [("delete", l) for l in layers] if "delete" in kinds else []
    return out + ([("swap", l) for l in layers if l + 1 < n_layers] if "swap" in kinds else [])


def _context(handle, kind: str, layer: int):
    return delete_layers(handle, [layer]) if kind == "delete" else swap_layers(handle, layer)


def layer_intervention_sweep(handle, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                             layers=None, kinds=("delete", "swap"), batch_size: int = 4,
                             progress: bool = True) -> xr.Dataset:
    """Delete / swap each layer in turn on (b, p) token ids (right-padded, ``attention_mask`` 1 on real tokens)."""
    plan = interventions(handle.n_layers, layers, kinds)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if input_ids.shape[1] < 2:
        raise ValueError("prompts need at least 2 tokens (a next token to score).")
    sums = np.zeros((len(plan), len(METRICS)))
    base_loss = base_entropy = 0.0
    n_tokens = 0
    bar = tqdm(total=len(plan) * ((len(input_ids) + batch_size - 1) // batch_size), desc="layer interventions",
               disable=not progress)
    for start in range(0, len(input_ids), batch_size):
        ids, m = input_ids[start : start + batch_size], mask[start : start + batch_size]
        scored = (m[:, :-1] * m[:, 1:]).bool()  # positions with a real next token
        nxt = ids[:, 1:, None]
        p = next_token_distributions(handle, ids, m)[:, :-1][scored.to(handle.device)]
        nxt = nxt.to(handle.device)[scored.to(handle.device)]
        p_top = p.argmax(-1)
        p_loss = -p.gather(-1, nxt)[:, 0]
        n_tokens += len(p)
        base_loss += float(p_loss.sum())
        base_entropy += float(entropy_from_logprobs(p).sum())
        for i, (kind, layer) in enumerate(plan):
            with _context(handle, kind, layer):
                q = next_token_distributions(handle, ids, m)[:, :-1][scored.to(handle.device)]
            sums[i] += [float(kl_from_logprobs(p, q).clamp_min(0).sum()),
                        float((-q.gather(-1, nxt)[:, 0] - p_loss).sum()),
                        float(entropy_from_logprobs(q).sum()),
                        float((q.argmax(-1) == p_top).sum())]
            bar.update()
    bar.close()
    means = sums / n_tokens
    kinds_ = [k for k, _ in plan]
    layers_ = [l for _, l in plan]
    ds = xr.Dataset(
        {name: ("intervention", means[:, j]) for j, name in enumerate(METRICS)},
        coords={"intervention": [f"{k} {l}" if k == "delete" else f"swap {l}-{l + 1}" for k, l in plan],
                "kind": ("intervention", kinds_), "layer": ("intervention", layers_),
                "relative_depth": ("intervention", [(l + (0.5 if k == "delete" else 1.0)) / handle.n_layers
                                                    for k, l in plan])},
        attrs={"analysis": "layer_stages.layer_intervention_sweep", "model": handle.name, "n_layers": handle.n_layers,
               "tokens": n_tokens, "base_loss": base_loss / n_tokens, "base_entropy": base_entropy / n_tokens,
               "forward_passes": (len(plan) + 1) * ((len(input_ids) + batch_size - 1) // batch_size)},
    )
    ds["kl"].attrs.update(long_name="KL(original || intervened)", units="nats")
    ds["loss_change"].attrs.update(long_name="change of next-token loss", units="nats")
    ds["entropy"].attrs.update(long_name="entropy of the intervened output", units="nats")
    ds["top1_retention"].attrs.update(long_name="share of tokens keeping the original top-1")
    return ds
