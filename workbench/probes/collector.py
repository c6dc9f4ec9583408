"""Apply probe reductions to sites as a backend produces them, one batch at a time."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..models import ModelHandle
from .catalog import BatchContext, Probe
from .hooks import site_map

# (variable name, layer or None, reduced batch value as numpy) -> None
Store = Callable[[str, "int | None", np.ndarray], None]


class BatchCollector:
    """Receives ``(site, layer, tensor)`` from a backend and hands on only the probes' reductions.

    Values go to ``store`` as soon as they are reduced, so no full activation outlives
    its hook; on the CPU the numpy array shares the tensor's memory (no copy).
    """

    def __init__(self, probes: list[Probe], ctx: BatchContext, store: Store):
        self.ctx = ctx
        self.store = store
        self.by_site: dict[str, list[Probe]] = {}
        for probe in probes:
            self.by_site.setdefault(probe.site, []).append(probe)

    @property
    def sites(self) -> set[str]:
        return set(self.by_site)

    def __call__(self, site: str, layer: int | None, tensor: torch.Tensor) -> None:
        for probe in self.by_site.get(site, ()):
            for name, value in probe.reduce(tensor.detach(), self.ctx, layer).items():
                value = value.cpu()
                self.store(name, layer, value.numpy() if not value.is_floating_point() else value.float().numpy())


def w_o_gram_getter(handle: ModelHandle):
    """layer -> W_O^h W_O^h^T for every head, (head, d_h, d_h), cached; W_O from the site map."""
    cache: dict[int, torch.Tensor] = {}

    def get(layer: int) -> torch.Tensor:
        if layer not in cache:
            w_o = site_map(handle).W_O(layer).float()  # (head, d_h, d_model)
            cache[layer] = w_o @ w_o.transpose(1, 2)
        return cache[layer]

    return get
