"""KV-cache redundancy: keys and values are deterministic projections of the residual stream.

Reproduces the checks of "The Residual Stream Is All You Need" (KV-cache redundancy). The paper
observes that in a decoder-only transformer the keys and values a layer caches are computed from
the residual stream entering that layer (and the positions) alone, so a cache of residuals
determines the KV cache, and the residual is smaller: 5 KB against 136 KB per token for Gemma 3 4B
in bf16. Three checks, none with model-specific code (everything goes through the site map,
:mod:`workbench.probes.sites`, and the hook engine, :func:`workbench.probes.hooks.forward`):

1. :func:`kv_recompute_error` - for each layer ``l``, a forward pass on *other* tokens (prompt B)
   with the residual entering layer ``l`` (``blocks.{l}.hook_resid_pre``) replaced by prompt A's,
   reading K and V at layer ``l`` (``hook_k``/``hook_v``, (b, p, kv_head, d_h), before rotary). They
   equal A's own K/V exactly when K/V at ``l`` are a function of the residual entering ``l`` and the
   positions only. Only layer ``l`` is edited, so layers ``< l`` run on B: any other channel into the
   attention (a cache shared across layers, a value residual, embeddings passed to every block)
   would carry B's information and show as a difference. Parallel-attention models (Falcon,
   GPT-J, NeoX) read the same normed residual and pass; an architecture that fails is reported,
   not hidden. The unedited B pass is the control (``*_unpatched``): what a wrong residual gives.
2. :func:`residual_patch_kl` - A's full residual patched into B's pass at the input of layer ``l``
   gives A's output exactly: ``kl_full`` = max over positions of KL(p_A || p_patched) is 0 at every
   layer. Patching only the last position does not: ``kl_last_position`` is the KL *at the last
   position* (the only position the patch could fix; earlier positions are B's own), > 0 because
   that query still attends to B's keys and values at layers >= l. At layer 0 the residual is the
   embedding, so this patch is "B's prefix with A's last token": still > 0 whenever the prefixes
   differ (it is 0 only if A and B share every token before the last).
3. :func:`cache_memory` - residual vs KV-cache bytes per token from a model config.

Inputs: token ids (1, p) (or (b, p)); A and B of the same shape, so that positions and masks agree.
Outputs: ``xr.Dataset`` with dim ``layer``; KL in nats, differences in the model's dtype units.
On CPU in float32 the same kernels run on the same inputs, so differences and KL are exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch
import xarray as xr

from ..numerics import kl_from_logprobs, log_softmax
from ..probes import hooks
from ..probes.interventions import patch_residual
from ..probes.sites import K, RESID_PRE, V


def _layers(handle, layers) -> list[int]:
    n = handle.n_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise IndexError(f"layers {bad} out of range: {handle.name} has layers 0..{n - 1}.")
    if not layers:
        raise ValueError("no layers to check.")
    return layers


def _pair(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_a, ids_b = (torch.as_tensor(x) for x in (ids_a, ids_b))
    ids_a, ids_b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (ids_a, ids_b))
    if ids_a.dim() != 2 or ids_a.shape != ids_b.shape:
        raise ValueError(f"prompts A and B need token ids of the same (b, p) shape (same positions); "
                         f"got {tuple(ids_a.shape)} and {tuple(ids_b.shape)}.")
    if ids_a.shape[1] < 2:
        raise ValueError("prompts need at least 2 tokens.")
    if torch.equal(ids_a, ids_b):
        raise ValueError("prompts A and B are identical: the check needs different tokens.")
    return ids_a, ids_b


def _read(handle, ids, reads, edits=None) -> dict:
    got: dict = {}
    hooks.forward(handle, ids, reads=reads, on_site=lambda s, l, t: got.__setitem__((s, l), t.detach().clone()),
                  edits=edits, logits=False)
    return got


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _attrs(handle, ids, **extra) -> dict:
    return {"model": handle.name, "architecture": handle.architecture, "n_tokens": int(ids.shape[1]),
            "dtype": str(handle.dtype).replace("torch.", ""), **extra}


def kv_recompute_error(handle, input_ids_a: torch.Tensor, input_ids_b: torch.Tensor, layers=None) -> xr.Dataset:
    """Max |K_A - K(resid_A)| and |V_A - V(resid_A)| per layer, K/V recomputed in B's pass.

    For each layer ``l``: A's pass reads ``resid_pre[l]``, ``K[l]``, ``V[l]``; B's pass with
    ``resid_pre[l] := A's`` reads K and V again (see the module docstring). Dims: (b, p) ids ->
    ``key_max_abs_diff``, ``value_max_abs_diff``, the controls ``key_max_abs_diff_unpatched`` /
    ``value_max_abs_diff_unpatched`` (B's own K/V vs A's) and ``key_max_abs`` (A's scale), all (layer).
    """
    layers = _layers(handle, layers)
    ids_a, ids_b = _pair(input_ids_a, input_ids_b)
    sites = [(s, l) for l in layers for s in (RESID_PRE, K, V)]
    a = _read(handle, ids_a, sites)
    b = _read(handle, ids_b, [(s, l) for l in layers for s in (K, V)])
    rows = {k: [] for k in ("key_max_abs_diff", "value_max_abs_diff", "key_max_abs_diff_unpatched",
                            "value_max_abs_diff_unpatched", "key_max_abs")}
    for l in layers:
        resid = a[(RESID_PRE, l)]
        patched = _read(handle, ids_b, [(K, l), (V, l)], {(RESID_PRE, l): lambda h, r=resid: r.to(h.device, h.dtype)})
        rows["key_max_abs_diff"].append(_maxdiff(patched[(K, l)], a[(K, l)]))
        rows["value_max_abs_diff"].append(_maxdiff(patched[(V, l)], a[(V, l)]))
        rows["key_max_abs_diff_unpatched"].append(_maxdiff(b[(K, l)], a[(K, l)]))
        rows["value_max_abs_diff_unpatched"].append(_maxdiff(b[(V, l)], a[(V, l)]))
        rows["key_max_abs"].append(float(a[(K, l)].abs().max()))
    ds = xr.Dataset({k: ("layer", v) for k, v in rows.items()}, coords={"layer": layers})
    ds.attrs.update(_attrs(handle, ids_a, method="K/V at layer l read in prompt B's forward pass with "
                           "resid_pre[l] replaced by prompt A's, compared with A's own K/V (max |diff|)"))
    return ds


def residual_patch_kl(handle, ids_a: torch.Tensor, ids_b: torch.Tensor, layers=None) -> xr.Dataset:
    """KL(p_A || p_patched) when A's residual entering layer ``l`` replaces B's, fully or at the last position.

    Dims: (b, p) ids -> ``kl_full`` (layer; max over batch and positions), ``kl_last_position``
    (layer; max over batch of the KL at the last position) and the scalar ``kl_unpatched_last_position``
    (B's own output vs A's there). In nats.
    """
    layers = _layers(handle, layers)
    ids_a, ids_b = _pair(ids_a, ids_b)
    resid_a, resid_b = ({} for _ in range(2))
    logp_a = log_softmax(hooks.forward(handle, ids_a, reads=[(RESID_PRE, l) for l in layers],
                                       on_site=lambda s, l, t: resid_a.__setitem__(l, t.detach().clone())).logits)
    hooks.forward(handle, ids_b, reads=[(RESID_PRE, l) for l in layers], logits=False,
                  on_site=lambda s, l, t: resid_b.__setitem__(l, t.detach().clone()))

    def kl() -> torch.Tensor:  # (b, p): B's forward pass, under whatever patch is active, against A's output
        return kl_from_logprobs(logp_a, log_softmax(hooks.forward(handle, ids_b).logits))

    full, last = [], []
    for l in layers:
        with patch_residual(handle, l, resid_a[l]):
            full.append(float(kl().max()))
        last_only = resid_b[l].clone()
        last_only[:, -1] = resid_a[l][:, -1]
        with patch_residual(handle, l, last_only):
            last.append(float(kl()[:, -1].max()))
    ds = xr.Dataset({"kl_full": ("layer", full), "kl_last_position": ("layer", last),
                     "kl_unpatched_last_position": ((), float(kl()[:, -1].max()))}, coords={"layer": layers})
    ds["kl_full"].attrs.update(long_name="max over positions of KL(p_A || p_B, full resid_pre[l] of A)", units="nats")
    ds["kl_last_position"].attrs.update(long_name="KL(p_A || p_B, last position of resid_pre[l] from A) "
                                                  "at the last position", units="nats")
    ds.attrs.update(_attrs(handle, ids_a))
    return ds


def _text_config(config):
    if hasattr(config, "hf_model"):  # a ModelHandle
        config = config.hf_model.config
    if isinstance(config, Mapping):
        config = SimpleNamespace(**{**config, **({"text_config": SimpleNamespace(**config["text_config"])}
                                                 if isinstance(config.get("text_config"), Mapping) else {})})
    text = getattr(config, "text_config", None)  # multimodal wrappers (Gemma3Config) nest the language model
    return text if text is not None and getattr(config, "hidden_size", None) is None else config


def _field(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def cache_memory(config, dtype_bytes: int = 2) -> dict:
    """Residual vs KV-cache bytes per token from a model config (a ``PretrainedConfig``, dict or handle).

    ``kv_bytes_per_token = 2 (K and V) * n_layers * n_kv_heads * head_dim * dtype_bytes``: the full
    cache of every layer, sliding-window layers included (their count and window are reported,
    not subtracted). ``residual_bytes_per_token = d_model * dtype_bytes``: the residual of one layer,
    the paper's count (K/V of every layer are recomputed from it layer by layer, or from the
    per-layer residuals); ``residual_all_layers_bytes_per_token`` stores the residual entering every
    layer. KV heads: ``num_key_value_heads`` (or ``num_kv_heads``), 1 for multi-query models,
    else ``num_attention_heads``; head_dim: ``config.head_dim`` or ``d_model / n_heads``.
    """
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be positive, got {dtype_bytes}.")
    c = _text_config(config)
    d_model = _field(c, "hidden_size", "n_embd", "d_model")
    n_layers = _field(c, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _field(c, "num_attention_heads", "n_head", "num_heads")
    missing = [n for n, v in (("hidden_size", d_model), ("num_hidden_layers", n_layers),
                              ("num_attention_heads", n_heads)) if v is None]
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}: cannot size the residual and KV cache.")
    if _field(c, "kv_lora_rank") is not None:
        raise ValueError("latent attention (kv_lora_rank) caches a compressed latent, not per-head K/V; "
                         "this calculator counts per-head caches only.")
    if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
        n_kv = 1
    else:
        n_kv = _field(c, "num_key_value_heads", "num_kv_heads") or n_heads
    head_dim = _field(c, "head_dim")
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"no head_dim in the config and hidden_size {d_model} is not divisible by {n_heads} heads.")
        head_dim = d_model // n_heads
    layer_types = list(getattr(c, "layer_types", None) or [])
    kv = 2 * n_layers * n_kv * head_dim * dtype_bytes
    residual = d_model * dtype_bytes
    return {
        "model_type": getattr(c, "model_type", None),
        "d_model": int(d_model), "n_layers": int(n_layers), "n_heads": int(n_heads),
        "n_kv_heads": int(n_kv), "head_dim": int(head_dim), "dtype_bytes": int(dtype_bytes),
        "n_sliding_layers": sum(t == "sliding_attention" for t in layer_types),
        "sliding_window": getattr(c, "sliding_window", None),
        "residual_bytes_per_token": int(residual),
        "residual_all_layers_bytes_per_token": int(n_layers * residual),
        "kv_bytes_per_token": int(kv),
        "kv_to_residual_ratio": kv / residual,
    }
