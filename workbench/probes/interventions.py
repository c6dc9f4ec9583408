"""Interventions: forward passes with a component of the model changed.

Like the capture backends, this is hook code and lives with the probes. Each
intervention is a context manager over a :class:`~workbench.models.ModelHandle`'s
Hugging Face model; :func:`token_logprobs` runs the forward pass whose outputs the
analyses compare. Hooks are always removed on exit, also on error.

- :func:`ablate_heads`: a head's output replaced by zero, or by the value of the sink
  token (its attention moved entirely onto key 0).
- :func:`scale_first_token_attention`: every query's attention to key 0 multiplied by
  ``s`` and the row renormalised (ZeroTuning), in chosen layers.
- :func:`edit_residual`: the residual stream leaving a layer passed through a function.
- :func:`sliding_window_mask`: an attention mask keeping the first ``n_sink`` keys plus
  a recent window (StreamingLLM), passed to :func:`token_logprobs`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from ..models import ModelHandle


def _check_layer(handle: ModelHandle, layer: int) -> None:
    if not 0 <= layer < handle.n_layers:
        raise IndexError(f"layer {layer} is out of range: {handle.name} has layers 0..{handle.n_layers - 1}.")


def _check_head(handle: ModelHandle, head: int) -> None:
    if not 0 <= head < handle.n_heads:
        raise IndexError(f"head {head} is out of range: {handle.name} has heads 0..{handle.n_heads - 1}.")


@contextmanager
def _hooks(handles) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablate_heads(handle: ModelHandle, heads: dict[int, list[int]], mode: str = "zero"):
    """Replace the outputs of ``heads`` ({layer: [head, ...]}) before W_O.

    ``mode="zero"``: the head writes nothing. ``mode="sink"``: the head attends only to
    the first token, so every query's head output is the first token's value vector
    (the dormant-head behaviour of Guo et al., 2024).
    """
    if mode not in ("zero", "sink"):
        raise ValueError(f"mode must be 'zero' or 'sink', got {mode!r}.")
    d_h, group = handle.head_dim, handle.n_heads // handle.n_kv_heads
    hooks, stash = [], {}
    for layer, layer_heads in heads.items():
        _check_layer(handle, layer)
        for h in layer_heads:
            _check_head(handle, h)
        attn = handle.hf_model.model.layers[layer].self_attn
        if mode == "sink":

            def keep_values(module, args, output, layer=layer):
                stash[layer] = output  # (b, p, kv * d_h)

            hooks.append(attn.v_proj.register_forward_hook(keep_values))

        def replace(module, args, layer=layer, layer_heads=tuple(layer_heads)):
            x = args[0].clone()  # (b, p, head * d_h): the heads' outputs, concatenated
            for h in layer_heads:
                if mode == "zero":
                    x[..., h * d_h : (h + 1) * d_h] = 0
                else:
                    kv = h // group
                    x[..., h * d_h : (h + 1) * d_h] = stash[layer][:, :1, kv * d_h : (kv + 1) * d_h]
            return (x, *args[1:])

        hooks.append(attn.o_proj.register_forward_pre_hook(replace))
    return _hooks(hooks)


def scale_first_token_attention(handle: ModelHandle, layers, scale: float):
    """Multiply the attention every query pays the first token by ``scale`` and renormalise.

    Implemented exactly by adding log(scale) to key 0's column of the additive attention
    mask before the softmax: softmax(z + log s e_0) = (s a_0, a_1, ...) / (s a_0 + 1 - a_0).
    ZeroTuning ("initial-token attention") tunes this scale per layer or head.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")
    if handle.attn_implementation != "eager":
        raise RuntimeError("scaling attention needs eager attention: load_model(..., attn_implementation='eager').")
    hooks = []
    for layer in layers:
        _check_layer(handle, layer)

        def shift(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None:
                raise RuntimeError("no attention mask reached the attention module; cannot rescale key 0.")
            bias = math.log(scale) if scale > 0 else torch.finfo(mask.dtype).min
            mask = mask.clone()
            mask[..., 1:, 0] = mask[..., 1:, 0] + bias  # query 0 sees only key 0: leave it
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(handle.hf_model.model.layers[layer].self_attn.register_forward_pre_hook(shift, with_kwargs=True))
    return _hooks(hooks)


def edit_residual(handle: ModelHandle, layer: int, edit):
    """Replace the residual stream leaving ``layer`` by ``edit(hidden)`` ((b, p, d_model) -> same).

    Massive-activation experiments (Sun et al., 2024) zero chosen entries or set them to
    their mean; the analysis supplies ``edit``.
    """
    _check_layer(handle, layer)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = edit(hidden.clone())
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return _hooks([handle.hf_model.model.layers[layer].register_forward_hook(hook)])


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
    with torch.no_grad():
        out = handle.hf_model(
            input_ids=input_ids.to(handle.device),
            attention_mask=None if attention_mask is None else attention_mask.to(handle.device),
            output_attentions=output_attentions,
            use_cache=False,
        )
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = logprobs.gather(-1, input_ids[:, 1:, None].to(logprobs.device))[..., 0]
    return (target, out.attentions) if output_attentions else target


def next_token_distributions(handle: ModelHandle, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Log-probabilities over the vocabulary at every position, (b, p, vocab), float32."""
    with torch.no_grad():
        out = handle.hf_model(
            input_ids=input_ids.to(handle.device),
            attention_mask=None if attention_mask is None else attention_mask.to(handle.device),
            use_cache=False,
        )
    return torch.log_softmax(out.logits.float(), dim=-1)
