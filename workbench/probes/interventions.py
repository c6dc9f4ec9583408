"""Interventions: forward passes with a component of the model changed, expressed on sites.

Every intervention is a set of edits on the site map's sites (:mod:`workbench.probes.sites`),
placed by the same hook engine that runs captures (:func:`workbench.probes.hooks.hooked`). Each
function checks its arguments at once and returns a context manager; inside it, any forward pass
(:func:`token_logprobs`, a capture, generation) runs with the change. Hooks are removed on
exit, also on error.

- :func:`ablate_heads`: a head's output (``hook_z``) replaced by zero, or by the value of the
  sink token (its attention moved entirely onto key 0).
- :func:`scale_first_token_attention`: every query's attention to key 0 multiplied by ``s`` and
  the row renormalised (ZeroTuning), by editing ``hook_mask``.
- :func:`edit_residual`: the residual stream leaving a layer passed through a function.
- :func:`patch_residual`: the residual entering (or leaving) a layer replaced by given values.
- :func:`delete_layers` / :func:`swap_layers`: whole blocks skipped or run in swapped order
  ("The Remarkable Robustness of LLMs: Stages of Inference?").
- :func:`sliding_window_mask`: an attention mask keeping the first ``n_sink`` keys plus a
  recent window (StreamingLLM), passed to :func:`token_logprobs`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..models import ModelHandle
from . import hooks
from .sites import MASK, RESID_POST, RESID_PRE, V, Z


def _check_layer(handle: ModelHandle, layer: int) -> None:
    if not 0 <= layer < handle.n_layers:
        raise IndexError(f"layer {layer} is out of range: {handle.name} has layers 0..{handle.n_layers - 1}.")


def _check_head(handle: ModelHandle, head: int) -> None:
    if not 0 <= head < handle.n_heads:
        raise IndexError(f"head {head} is out of range: {handle.name} has heads 0..{handle.n_heads - 1}.")


def ablate_heads(handle: ModelHandle, heads: dict[int, list[int]], mode: str = "zero"):
    """Replace the outputs of ``heads`` ({layer: [head, ...]}) before W_O (site ``hook_z``).

    ``mode="zero"``: the head writes nothing. ``mode="sink"``: the head attends only to
    the first token, so every query's head output is the first token's value vector
    (the dormant-head behaviour of Guo et al., 2024).
    """
    if mode not in ("zero", "sink"):
        raise ValueError(f"mode must be 'zero' or 'sink', got {mode!r}.")
    for layer, layer_heads in heads.items():
        _check_layer(handle, layer)
        for h in layer_heads:
            _check_head(handle, h)
    group = handle.n_heads // handle.n_kv_heads
    values: dict[int, torch.Tensor] = {}  # layer -> (b, p, kv_head, d_h), read just before hook_z

    def replace(layer, layer_heads):
        def edit(z):  # (b, p, head, d_h)
            z = z.clone()
            for h in layer_heads:
                z[:, :, h] = 0 if mode == "zero" else values[layer][:, :1, h // group]
            return z

        return edit

    reads = [(V, layer) for layer in heads] if mode == "sink" else []
    edits = {(Z, layer): replace(layer, tuple(hs)) for layer, hs in heads.items()}
    return hooks.hooked(handle, reads, lambda s, layer, v: values.__setitem__(layer, v), edits)


def scale_first_token_attention(handle: ModelHandle, layers, scale: float):
    """Multiply the attention every query pays the first token by ``scale`` and renormalise.

    Implemented exactly by adding log(scale) to key 0's column of the additive attention
    mask (site ``hook_mask``) before the softmax: softmax(z + log s e_0) = (s a_0, a_1, ...) / (s a_0 + 1 - a_0).
    ZeroTuning ("initial-token attention") tunes this scale per layer or head.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")
    layers = list(layers)
    for layer in layers:
        _check_layer(handle, layer)
    if handle.attn_implementation != "eager":
        raise RuntimeError("scaling attention needs eager attention: load_model(..., attn_implementation='eager').")

    def shift(mask):
        if mask is None or not mask.is_floating_point():
            raise RuntimeError(f"{handle.architecture} passes no additive float attention mask to its attention; "
                               "first-token scaling cannot be applied to it.")
        bias = math.log(scale) if scale > 0 else torch.finfo(mask.dtype).min
        mask = mask.clone()
        mask[..., 1:, 0] = mask[..., 1:, 0] + bias  # query 0 sees only key 0: leave it
        return mask

    return hooks.hooked(handle, edits={(MASK, layer): shift for layer in layers})


def edit_residual(handle: ModelHandle, layer: int, edit):
    """Replace the residual stream leaving ``layer`` by ``edit(hidden)`` ((b, p, d_model) -> same).

    Massive-activation experiments (Sun et al., 2024) zero chosen entries or set them to
    their mean; the analysis supplies ``edit``.
    """
    _check_layer(handle, layer)
    return hooks.hooked(handle, edits={(RESID_POST, layer): lambda h: edit(h.clone())})


def patch_residual(handle: ModelHandle, layer: int, values: torch.Tensor, *, site: str = RESID_PRE):
    """Replace the residual entering ``layer`` (``site=RESID_PRE``) or leaving it (``RESID_POST``) by ``values`` (b, p, d_model)."""
    _check_layer(handle, layer)
    if site not in (RESID_PRE, RESID_POST):
        raise ValueError(f"site must be {RESID_PRE!r} or {RESID_POST!r}, got {site!r}.")

    def patch(h):
        if values.shape != h.shape:
            raise ValueError(f"patch values have shape {tuple(values.shape)}; the residual here is {tuple(h.shape)}.")
        return values.to(h.device, h.dtype)

    return hooks.hooked(handle, edits={(site, layer): patch})


def delete_layers(handle: ModelHandle, layers):
    """Skip whole blocks: each listed block passes its input through unchanged (resid_post = resid_pre)."""
    layers = sorted(set(layers))
    for layer in layers:
        _check_layer(handle, layer)
    entering: dict[int, torch.Tensor] = {}
    return hooks.hooked(handle, [(RESID_PRE, l) for l in layers], lambda s, l, h: entering.__setitem__(l, h),
                        {(RESID_POST, l): (lambda h, l=l: entering[l]) for l in layers})


@contextmanager
def swap_layers(handle: ModelHandle, layer: int):
    """Run block ``layer + 1`` before block ``layer`` (each keeps its own weights and attention type).

    The blocks are swapped in the model's block list for the duration and put back on exit.
    """
    _check_layer(handle, layer)
    _check_layer(handle, layer + 1)
    blocks = handle.hf_model.get_submodule(handle.sites.blocks_path)
    first, second = blocks[layer], blocks[layer + 1]
    blocks[layer], blocks[layer + 1] = second, first
    try:
        yield
    finally:
        blocks[layer], blocks[layer + 1] = first, second


def sliding_window_mask(n: int, window: int, n_sink: int = 4, dtype=torch.float32) -> torch.Tensor:
    """Additive (1, 1, n, n) mask: query q sees keys k <= q with q - k < window, plus k < n_sink.

    ``n_sink=0`` gives plain window attention. Positions stay the original ones (the
    rotary phases of the window tokens are what StreamingLLM's cache gives them; the
    sink tokens keep their own positions rather than being re-indexed next to the window).
    """
    if window < 1 or n_sink < 0:
        raise ValueError(f"window must be >= 1 and n_sink >= 0, got window={window}, n_sink={n_sink}.")
    q = torch.arange(n).unsqueeze(1)
    k = torch.arange(n).unsqueeze(0)
    allowed = (k <= q) & ((q - k < window) | (k < n_sink))
    mask = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def token_logprobs(
    handle: ModelHandle,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    output_attentions: bool = False,
):
    """Log-probability of each next token, (b, p - 1), and optionally the attention patterns.

    ``attention_mask``: (b, p) padding mask or a full additive (b, 1, p, p) mask.
    """
    out = hooks.forward(handle, input_ids, attention_mask, output_attentions=output_attentions)
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = logprobs.gather(-1, input_ids[:, 1:, None].to(logprobs.device))[..., 0]
    return (target, out.attentions) if output_attentions else target


def next_token_distributions(handle: ModelHandle, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Log-probabilities over the vocabulary at every position, (b, p, vocab), float32."""
    return torch.log_softmax(hooks.forward(handle, input_ids, attention_mask).logits.float(), dim=-1)
