"""Apply probe reductions to sites as a backend produces them, one batch at a time."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..models import ModelHandle
from .catalog import BatchContext, Probe, w_o_factor
from .hooks import site_map

# (variable name, layer, None or slice(None) for all layers, reduced batch value as numpy) -> None
Store = Callable[[str, "int | slice | None", np.ndarray], None]


class BatchCollector:
    """Receives ``(site, layer, tensor)`` from a backend and hands on only the probes' reductions.

    On the CPU, values go to ``store`` as soon as they are reduced, so no full activation
    outlives its hook (the numpy array shares the tensor's memory: no copy). On a GPU, the
    reduced values wait on the device until :meth:`flush` (or until ``defer_bytes`` of them
    wait), which queues their copies to the host, and :meth:`finish` stores them: a blocking
    copy per hook would stall the forward pass at every layer, and waiting right after the
    forward would leave the GPU idle while the host stores. Small per-layer values (all layers
    of one variable within ``stack_bytes``: norms, attention received; on any device) are
    gathered where they are made into one array per variable and batch, stored at :meth:`flush`
    in one copy and one store instead of one per layer: on a GPU fast enough that the host's
    per-call work is the limit, that work is what a capture costs.

    ``skip``: ``(variable, layer)`` pairs not to store because the caller already has them
    (capture keeps ``resid_post[l]``, which is ``resid_pre[l + 1]``, only once).
    ``store(name, layer, value)``: ``layer`` is an int, None (no layer dim), or ``slice(None)``
    for all layers at once, the value's layer axis where the variable's dims have it.
    """

    def __init__(self, probes: list[Probe], ctx: BatchContext, store: Store, n_layers: int,
                 skip: frozenset[tuple[str, int]] = frozenset(), defer_bytes: int = 1 << 30,
                 stack_bytes: int = 1 << 28):
        self.ctx = ctx
        self.store = store
        self.n_layers = n_layers
        self.skip = skip
        self.defer_bytes = defer_bytes
        self.stack_bytes = stack_bytes
        self.pending: list[tuple[str, int | slice | None, torch.Tensor]] = []
        self.stacks: dict[str, torch.Tensor] = {}
        self.in_flight: list[tuple[object, list]] = []
        self.pending_bytes = 0
        self.by_site: dict[str, list[Probe]] = {}
        # where the layer axis goes in a stacked value: its place in the variable's dims (sample first)
        self.layer_axis = {v.name: v.dims.index("layer") for p in probes for v in p.variables if "layer" in v.dims}
        skipped = {name for name, _ in skip}
        for name in skipped:
            self.layer_axis.pop(name, None)  # some layers are not stored: never stacked
        for probe in probes:
            self.by_site.setdefault(probe.site, []).append(probe)

    @property
    def sites(self) -> set[str]:
        return set(self.by_site)

    def __call__(self, site: str, layer: int | None, tensor: torch.Tensor) -> None:
        for probe in self.by_site.get(site, ()):
            if all((v.name, layer) in self.skip for v in probe.variables):
                continue
            for name, value in probe.reduce(tensor.detach(), self.ctx, layer).items():
                if (name, layer) in self.skip:
                    continue
                on_host = value.device.type == "cpu"
                if not on_host and value.is_floating_point() and value.dtype != torch.float32:
                    value = value.float()  # on the device, in one kernel, not per element on the host
                axis = self.layer_axis.get(name)
                if layer is not None and axis is not None and \
                        value.numel() * value.element_size() * self.n_layers <= self.stack_bytes:
                    stack = self.stacks.get(name)
                    if stack is None:
                        shape = list(value.shape)
                        shape.insert(axis, self.n_layers)
                        stack = self.stacks[name] = value.new_empty(shape)
                    stack.select(axis, layer).copy_(value)
                    continue
                if on_host:
                    self._store(name, layer, value)
                    continue
                if value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                    value = value.clone()  # the model's own tensor: a later in-place op must not reach it
                self.pending.append((name, layer, value))
                self.pending_bytes += value.numel() * value.element_size()
                if self.pending_bytes >= self.defer_bytes:
                    self.flush(batch_done=False)

    def flush(self, batch_done: bool = True) -> None:
        """Start moving the values waiting on the device to the host, without waiting for them.

        CUDA values are copied into pinned host memory on the stream, after the kernels that
        made them; :meth:`finish` waits for those copies and stores them. Meanwhile the caller can
        queue the next batch's forward pass, so the GPU computes while the host stores. Stacked
        values go when the batch is done (:meth:`finish`, or the caller's flush after the forward),
        never part-filled.
        """
        if batch_done:
            self.pending.extend((name, slice(None), stack) for name, stack in self.stacks.items())
            self.stacks = {}
        copies = []
        for name, layer, value in self.pending:
            if value.is_cuda:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                host.copy_(value, non_blocking=True)
                copies.append((name, layer, host, value))  # the device value lives until its copy is done
            else:
                copies.append((name, layer, value.cpu(), None))
        if copies:
            event = torch.cuda.Event() if any(v is not None for *_, v in copies) else None
            if event is not None:
                event.record()
            self.in_flight.append((event, copies))
        self.pending.clear()
        self.pending_bytes = 0

    def finish(self) -> None:
        """Flush, wait for every copy in flight, and store the values."""
        self.flush()
        for event, copies in self.in_flight:
            if event is not None:
                event.synchronize()
            for name, layer, host, _ in copies:
                self._store(name, layer, host)
        self.in_flight.clear()

    def _store(self, name: str, layer: int | None, value: torch.Tensor) -> None:
        value = value.cpu()
        self.store(name, layer, value.numpy() if not value.is_floating_point() else value.float().numpy())


def w_o_factor_getter(handle: ModelHandle):
    """layer -> ``w_o_factor`` of that layer's W_O (head, d_h, d_h) in the model's dtype; W_O from the site map.

    Kept on the handle across captures while its weights stay as they are (edited, replaced or
    moved weights start a fresh cache).
    """
    state = handle._weights_state()
    cached = handle.__dict__.get("_w_o_factors")
    if cached is None or cached[0] != state:
        cached = handle.__dict__["_w_o_factors"] = (state, {})
    factors = cached[1]

    def get(layer: int) -> torch.Tensor:
        if layer not in factors:  # in the model's dtype, as the values it multiplies
            factors[layer] = w_o_factor(site_map(handle).W_O(layer)).to(handle.dtype)
        return factors[layer]

    return get
