"""Find the probe sites in a forward pass: the only code that touches hooks.

Two real backends, one contract: ``run_batch(handle, input_ids, attention_mask,
sites, on_site)`` runs one forward pass and calls ``on_site(site, layer, tensor)``
for every requested site (``layer`` is ``None`` for global sites), in execution
order, while the tensor is live. Nothing is kept unless ``on_site`` keeps it, so a
reduction (attention received, value norms) never stores the full tensor.

- ``nnsight``: nnsight tracing on the handle's own Hugging Face model.
- ``transformer_lens``: TransformerLens ``TransformerBridge`` hooks on a private copy.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models import ModelHandle

OnSite = Callable[[str, "int | None", torch.Tensor], None]

BACKENDS = ("nnsight", "transformer_lens")

# Hugging Face module names whose output is each sublayer's update to the residual stream.
# Gemma 3 normalises each sublayer's output before adding it (sandwich norm).
_HF_UPDATE_MODULES = {
    "llama": {"attn_update": "self_attn", "mlp_update": "mlp"},
    "gemma3_text": {"attn_update": "post_attention_layernorm", "mlp_update": "post_feedforward_layernorm"},
}


class UnsupportedModelError(RuntimeError):
    pass


def run_batch(
    backend: str,
    handle: ModelHandle,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sites: set[str],
    on_site: OnSite,
) -> None:
    if backend == "nnsight":
        _run_nnsight(handle, input_ids, attention_mask, sites, on_site)
    elif backend == "transformer_lens":
        _run_transformer_lens(handle, input_ids, attention_mask, sites, on_site)
    else:
        raise ValueError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _nnsight_model(handle: ModelHandle, with_head: bool):
    """nnsight envelope of the causal LM, or of its base model when no logits are wanted
    (skipping the unembedding saves its (batch x pos x vocab) product and memory)."""
    cache = handle._nnsight
    if with_head not in cache:
        from nnsight import NNsight

        cache[with_head] = NNsight(handle.hf_model if with_head else handle.hf_model.model)
    return cache[with_head]


def _run_nnsight(handle, input_ids, attention_mask, sites, on_site) -> None:
    updates = _HF_UPDATE_MODULES.get(handle.architecture)
    if updates is None and sites & {"attn_update", "mlp_update"}:
        raise UnsupportedModelError(
            f"attn_out/mlp_out probes do not know where {handle.architecture!r} adds its sublayer outputs; "
            f"supported: {', '.join(_HF_UPDATE_MODULES)}."
        )
    with_head = "logits" in sites
    model = _nnsight_model(handle, with_head)
    base = model.model if with_head else model
    b, p = input_ids.shape
    with torch.no_grad(), model.trace(input_ids=input_ids, attention_mask=attention_mask, use_cache=False):
        # nnsight hands out module values in execution order, so read them in that order.
        for layer_idx, layer in enumerate(base.layers):
            if "resid_pre" in sites:
                on_site("resid_pre", layer_idx, layer.input)
            if "values" in sites:
                on_site("values", layer_idx, layer.self_attn.v_proj.output.view(b, p, handle.n_kv_heads, -1))
            if sites & {"attn_weights", "attn_update"}:
                attn_out, attn_weights = layer.self_attn.output[:2]
                if "attn_weights" in sites:
                    if attn_weights is None:
                        raise UnsupportedModelError("the attention returned no probabilities: load with attn_implementation='eager'.")
                    on_site("attn_weights", layer_idx, attn_weights)
                if "attn_update" in sites:
                    if updates["attn_update"] == "self_attn":
                        on_site("attn_update", layer_idx, attn_out)
                    else:
                        on_site("attn_update", layer_idx, getattr(layer, updates["attn_update"]).output)
            if "mlp_update" in sites:
                on_site("mlp_update", layer_idx, _first(getattr(layer, updates["mlp_update"]).output))
            if "resid_post" in sites:
                on_site("resid_post", layer_idx, _first(layer.output))
        if "final_norm" in sites:
            on_site("final_norm", None, base.norm.output)
        if "logits" in sites:
            on_site("logits", None, model.lm_head.output)


_TL_HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "attn_update": "blocks.{l}.hook_attn_out",
    "mlp_update": "blocks.{l}.hook_mlp_out",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_weights": "blocks.{l}.attn.hook_pattern",
    "values": "blocks.{l}.attn.hook_v",
    "final_norm": "ln_final.hook_out",
}


def _run_transformer_lens(handle, input_ids, attention_mask, sites, on_site) -> None:
    bridge = handle.transformer_bridge()
    hooks = []
    for site in sites - {"logits"}:
        template = _TL_HOOKS[site]
        layers = range(handle.n_layers) if "{l}" in template else [None]
        for layer_idx in layers:

            def hook(tensor, hook, site=site, layer_idx=layer_idx):
                on_site(site, layer_idx, tensor)

            hooks.append((template.format(l=layer_idx), hook))
    with torch.no_grad():
        logits = bridge.run_with_hooks(input_ids, fwd_hooks=hooks, attention_mask=attention_mask)
    if "logits" in sites:
        on_site("logits", None, logits)
