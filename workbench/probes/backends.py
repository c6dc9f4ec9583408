"""Capture backends: three ways to run one batch, one contract, one site map.

``run_batch(backend, handle, input_ids, attention_mask, sites, on_site)`` runs one forward pass
and calls ``on_site(site, layer, tensor)`` for every requested site (TransformerLens-style names
from :mod:`workbench.probes.sites`; ``layer`` is None for global sites) while the tensor is
live. Nothing is kept unless ``on_site`` keeps it, so a reduction (attention received, value
norms) never stores the full tensor.

- ``torch`` (default): PyTorch hooks placed by the site map (:mod:`workbench.probes.hooks`),
  the same code that runs interventions. Fastest; every architecture the site map resolves.
- ``nnsight``: the same site specs read through nnsight's tracing of the same Hugging Face
  model (in execution order, as nnsight requires); for users who work in nnsight. With ``remote=True``
  the forward runs on NDIF's servers (nnsight's remote execution, for hosted models whose weights are not
  here): the traced code only saves each needed module output or input, and the site values are computed
  here from what comes back. ``remote="local"`` runs that same request through nnsight's local simulation
  (serialised, deserialised, run in this process): how the remote path is tested without a network.
- ``transformer_lens``: TransformerLens ``TransformerBridge`` hooks of the same names on a
  private copy of the model (rebuilt when the handle's weights, dtype or device change).

All three give identical numbers (tests/test_architectures.py, tests/test_parity.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import hooks
from .sites import FINAL_NORM, LOGITS, SITES, is_layer_site

OnSite = Callable[[str, "int | None", torch.Tensor], None]

BACKENDS = ("torch", "nnsight", "transformer_lens")

def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")


def run_batch(backend: str, handle, input_ids: torch.Tensor, attention_mask: torch.Tensor, sites,
              on_site: OnSite, *, remote: bool | str = False) -> None:
    check_backend(backend)
    sites = set(sites)
    hooks.site_map(handle).require(sites)
    reads = hooks.expand(sorted(sites), handle.n_layers)
    with handle.lock:  # one forward at a time per model (see ModelHandle.lock)
        if backend == "torch":
            hooks.forward(handle, input_ids, attention_mask, reads=reads, on_site=on_site, logits=LOGITS in sites)
        elif backend == "nnsight":
            _run_nnsight(handle, input_ids, attention_mask, reads, on_site, remote)
        else:
            _run_transformer_lens(handle, input_ids, attention_mask, sites, on_site)


# --------------------------------------------------------------------------- nnsight


def _execution_order(handle) -> list[tuple[str, str]]:
    """Every site's ``(module path, "input"|"output")`` slot, in the order a forward pass reaches them.

    Recorded once per site map with plain hooks on a two-token forward, *before* nnsight wraps the
    model (a forward outside a trace would advance nnsight's per-module call counters). A model whose
    weights are elsewhere (``load_model(..., remote=True)``: its modules sit on the meta device) is timed
    on a tiny random stand-in of the same architecture and depth, whose modules have the same paths.
    """
    sm = hooks.site_map(handle)
    if "_nnsight_order" not in sm.__dict__:
        model = handle.hf_model
        if handle.device.type == "meta":
            from ..models.tiny import tiny_stand_in

            model = tiny_stand_in(handle.config)
        slots = {}
        for site, layer in hooks.expand([s for s in SITES if s not in sm.unsupported], sm.n_layers):
            spec = sm.spec(site, layer)
            slots[(spec.path, spec.io)] = model.get_submodule(spec.path)
        seen: list = []
        handles = []
        for slot, module in slots.items():
            def mark(*_, slot=slot):
                if slot not in seen:
                    seen.append(slot)

            handles.append(module.register_forward_hook(mark) if slot[1] == "output" else module.register_forward_pre_hook(mark))
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        sm.__dict__["_nnsight_order"] = seen
    return sm.__dict__["_nnsight_order"]


def _run_nnsight(handle, input_ids, attention_mask, reads, on_site, remote: bool | str = False) -> None:
    """One batch through nnsight, reading the slots in execution order.

    Locally each site value goes to ``on_site`` while the trace runs. Remotely (``remote``: True for NDIF,
    "local" for nnsight's simulation of it) the traced code runs where this package is not installed, so it
    only saves each slot's raw value, and the site values are computed here afterwards by the same functions.
    """
    sm = hooks.site_map(handle)
    by_slot = _by_slot(sm, reads)
    slots = [slot for slot in _execution_order(handle) if slot in by_slot]
    envelope = _remote_envelope(handle, remote) if remote else _local_envelope(handle)
    kwargs = hooks.forward_kwargs(sm, {site for site, _ in reads})
    if remote:  # what travels starts and ends on the host
        input_ids, attention_mask, kwargs = input_ids.cpu(), attention_mask.cpu(), {**kwargs, "remote": remote}
    batch_shape = tuple(input_ids.shape)

    def read(slot, value) -> None:  # value: the module's output, or its (args, kwargs)
        output, args, kw = (value, (), None) if slot[1] == "output" else (None, *value)
        for site, layer, spec in by_slot[slot]:
            raw = hooks.raw_value(spec, output=output, args=args, kwargs=kw)
            on_site(site, layer, hooks.site_value(site, layer, spec, raw, batch_shape))

    if remote:
        for slot, value in zip(slots, _saved_remotely(envelope, slots, input_ids, attention_mask, kwargs)):
            read(slot, value)
        return
    with torch.no_grad(), envelope.trace(input_ids=input_ids, attention_mask=attention_mask, **kwargs):
        for path, io in slots:
            envoy = envelope.get(path) if path else envelope
            read((path, io), envoy.output if io == "output" else envoy.inputs)


def _saved_remotely(envelope, slots, input_ids, attention_mask, kwargs) -> list:
    """Each slot's raw value from a remote trace. The traced code is sent to the server, so it references only
    nnsight and plain values (not this package, whose functions the server cannot import)."""
    import nnsight

    with torch.no_grad(), envelope.trace(input_ids=input_ids, attention_mask=attention_mask, **kwargs):
        saved = nnsight.save([])
        for path, io in slots:
            envoy = envelope.get(path) if path else envelope
            saved.append(envoy.output.save() if io == "output" else envoy.inputs.save())
    return saved


def _by_slot(sm, reads) -> dict[tuple[str, str], list]:
    """The sites to read grouped by the module slot ``(path, "input"|"output")`` they come from."""
    by_slot: dict[tuple[str, str], list] = {}
    for site, layer in reads:
        spec = sm.spec(site, layer)
        by_slot.setdefault((spec.path, spec.io), []).append((site, layer, spec))
    return by_slot


def _local_envelope(handle):
    """nnsight's wrapper of the handle's own model, made once per model object."""
    from nnsight import NNsight

    envelope = handle.__dict__.get("_nnsight_model")
    if envelope is None or envelope._module is not handle.hf_model:
        envelope = NNsight(handle.hf_model)
        handle.__dict__["_nnsight_model"] = envelope
    return envelope


def _remote_envelope(handle, remote: bool | str):
    """nnsight's wrapper for remote execution: for NDIF, the hub id the server knows the model by (nnsight builds
    the structure without weights); for the local simulation, the handle's own model."""
    from nnsight import TransformersModel

    key = f"_nnsight_remote_{remote}"
    envelope = handle.__dict__.get(key)
    if envelope is None:
        if remote == "local":
            envelope = TransformersModel(handle.hf_model, task="text-generation", tokenizer=handle.tokenizer)
        else:
            envelope = TransformersModel(handle.hub_id, task="text-generation")
        handle.__dict__[key] = envelope
    return envelope


# --------------------------------------------------------------------------- TransformerLens

# Bridge hook names where they differ from the site names.
_TL_NAMES = {FINAL_NORM: "ln_final.hook_out"}


def _run_transformer_lens(handle, input_ids, attention_mask, sites, on_site) -> None:
    bridge = handle.transformer_bridge()
    fwd_hooks = []
    for site in sites - {LOGITS}:
        template = _TL_NAMES.get(site, site)
        for layer in range(handle.n_layers) if is_layer_site(site) else [None]:

            def hook(tensor, hook, site=site, layer=layer):
                on_site(site, layer, tensor)

            fwd_hooks.append((template.format(l=layer), hook))
    with torch.no_grad():
        logits = bridge.run_with_hooks(input_ids, fwd_hooks=fwd_hooks, attention_mask=attention_mask)
    if LOGITS in sites:
        on_site(LOGITS, None, logits)
