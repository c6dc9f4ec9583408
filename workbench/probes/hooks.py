"""The one way the workbench reaches into a model: PyTorch hooks placed by the site map.

:func:`forward` runs one forward pass of a :class:`~workbench.models.ModelHandle`'s Hugging Face
model with any number of *reads* (``on_site(site, layer, tensor)`` is called while the tensor is
live, in execution order) and *edits* (``{(site, layer): fn}``, ``fn(tensor) -> tensor`` replaces
the site's value in the forward pass). Captures, interventions (head ablation, attention
re-weighting, residual edits and patches, layer deletion), lenses and streaming features all
run through it; sites are named and resolved in :mod:`workbench.probes.sites`. Reads see a
site's value before an edit at the same site. Hooks are removed on exit, also on error, and a
requested site that the forward pass never produced is an error, never a silent gap.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from .sites import LOGITS, MASK, PATTERN, SiteMap, SiteSpec, UnsupportedSiteError, is_layer_site

OnSite = Callable[[str, "int | None", torch.Tensor], None]
Edit = Callable[[torch.Tensor], torch.Tensor]
SiteKey = tuple[str, "int | None"]


def site_map(handle) -> SiteMap:
    """The handle's site map, built once per Hugging Face model object."""
    cached = handle.__dict__.get("_site_map")
    if cached is None or cached.hf_model is not handle.hf_model:
        cached = SiteMap(handle.hf_model)
        handle.__dict__["_site_map"] = cached
    return cached


def expand(sites: Iterable[str], n_layers: int) -> list[SiteKey]:
    """``(site, layer)`` for every layer of per-layer sites, ``(site, None)`` for global ones."""
    return [(s, l) for s in sites for l in (range(n_layers) if is_layer_site(s) else [None])]


@contextmanager
def hooked(handle, reads: Iterable[SiteKey] = (), on_site: OnSite | None = None,
           edits: dict[SiteKey, Edit] | None = None, batch_shape: tuple[int, int] | None = None) -> Iterator[set]:
    """Place read and edit hooks for the duration of the block; yields the set of sites that fired.

    ``batch_shape`` (b, p): sites a model computes on flattened tokens are viewed as (b, p, ...).
    """
    sm = site_map(handle)
    reads, edits = list(reads), dict(edits or {})
    sm.require([s for s, _ in reads] + [s for s, _ in edits])
    entries: dict[tuple[int, str], list] = {}
    modules: dict[tuple[int, str], torch.nn.Module] = {}
    for key in dict.fromkeys([*reads, *edits]):
        site, layer = key
        spec = sm.spec(site, layer)
        if key in edits and spec.from_site is None:
            raise UnsupportedSiteError(f"{site} can be read but not edited on {sm.architecture}.")
        slot = (id(spec.module), spec.io)
        modules[slot] = spec.module
        entries.setdefault(slot, []).append((site, layer, spec, key in reads, edits.get(key)))
    fired: set = set()
    handles = []
    with handle.lock:  # no other thread's forward while these hooks are on the modules
        try:
            for slot, items in entries.items():
                module, io = modules[slot], slot[1]
                if io == "output":
                    handles.append(module.register_forward_hook(_output_hook(items, on_site, fired, batch_shape)))
                else:
                    handles.append(module.register_forward_pre_hook(_input_hook(items, on_site, fired, batch_shape),
                                                                    with_kwargs=True))
            yield fired
        finally:  # also when placing a hook failed: no hook left behind, the lock released
            for h in handles:
                h.remove()


def raw_value(spec: SiteSpec, output=None, args=(), kwargs=None):
    """The tensor a spec names in a module's output, or in its call's positional / keyword inputs."""
    if spec.io == "output":
        return output if isinstance(output, torch.Tensor) or spec.path == "" else output[spec.index]
    return args[spec.index] if 0 <= spec.index < len(args) else (kwargs or {}).get(spec.kwarg)


def site_value(site: str, layer, spec: SiteSpec, raw, batch_shape=None) -> torch.Tensor:
    """A raw tensor in the site's shape (every backend reads sites through this)."""
    value = spec.to_site(raw) if spec.to_site and raw is not None else raw
    if value is None:
        raise UnsupportedSiteError(f"{site} (layer {layer}) produced no tensor: load the model with "
                                   "attn_implementation='eager' (eager attention returns its probabilities "
                                   "and receives a full additive mask).")
    if batch_shape is not None and value.dim() == 2 and site not in (PATTERN, MASK):
        value = value.view(*batch_shape, -1)  # OPT runs its MLP on (b * p, d)
    return value


def forward_kwargs(sm: SiteMap, sites, **model_kwargs) -> dict:
    """The flags a forward pass reading ``sites`` needs: no KV cache, and ``output_attentions`` for the
    older models (Bloom, Falcon) that compute attention probabilities only when asked."""
    if PATTERN in sites and sm.attention_flag_needed:
        model_kwargs.setdefault("output_attentions", True)
    model_kwargs.setdefault("use_cache", False)
    return model_kwargs


def _apply(items, raw, put, on_site, fired, batch_shape):
    for site, layer, spec, read, edit in items:
        before = raw(spec)
        value = site_value(site, layer, spec, before, batch_shape)
        fired.add((site, layer))
        if read and on_site is not None:
            on_site(site, layer, value)
        if edit is not None:
            put(spec, spec.from_site(edit(value), before).reshape(before.shape))


def _output_hook(items, on_site, fired, batch_shape):
    def hook(module, args, output):
        box = [output]

        def put(spec: SiteSpec, value):
            out = box[0]
            box[0] = value if isinstance(out, torch.Tensor) else (*out[: spec.index], value, *out[spec.index + 1 :])

        _apply(items, lambda spec: raw_value(spec, output=box[0]), put, on_site, fired, batch_shape)
        return box[0] if box[0] is not output else None

    return hook


def _input_hook(items, on_site, fired, batch_shape):
    def hook(module, args, kwargs):
        box = [args, kwargs]

        def put(spec: SiteSpec, value):
            a, kw = box
            if 0 <= spec.index < len(a):
                box[0] = (*a[: spec.index], value, *a[spec.index + 1 :])
            else:
                box[1] = {**kw, spec.kwarg: value}

        _apply(items, lambda spec: raw_value(spec, args=box[0], kwargs=box[1]), put, on_site, fired, batch_shape)
        return (box[0], box[1]) if box[0] is not args or box[1] is not kwargs else None

    return hook


def forward(
    handle,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reads: Iterable[SiteKey] = (),
    on_site: OnSite | None = None,
    edits: dict[SiteKey, Edit] | None = None,
    logits: bool = True,
    **model_kwargs,
):
    """One forward pass with reads and edits; returns the Hugging Face output.

    ``logits=False`` runs the base model only (no unembedding: its (b, p, vocab) product is
    skipped). ``attention_mask``: (b, p) padding mask or a full additive (b, 1, p, p) mask.
    """
    reads, edits = list(reads), dict(edits or {})
    sm = site_map(handle)
    sites = {s for s, _ in reads} | {s for s, _ in edits}
    if PATTERN in sites and handle.attn_implementation != "eager":
        raise UnsupportedSiteError(f"{PATTERN} needs eager attention; {handle.name} uses {handle.attn_implementation!r}: "
                                   "load_model(..., attn_implementation='eager').")
    if LOGITS in sites:
        logits = True
    model = handle.hf_model if logits else handle.hf_model.base_model
    with torch.no_grad(), hooked(handle, reads, on_site, edits, tuple(input_ids.shape)) as fired:
        out = model(input_ids=input_ids.to(handle.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(handle.device),
                    **forward_kwargs(sm, sites, **model_kwargs))
    missing = [k for k in dict.fromkeys([*reads, *edits]) if k not in fired]
    if missing:
        raise UnsupportedSiteError(f"{handle.name}: the forward pass never produced "
                                   f"{', '.join(f'{s} (layer {l})' for s, l in missing[:4])}"
                                   f"{' ...' if len(missing) > 4 else ''}; this architecture computes it another way.")
    return out
