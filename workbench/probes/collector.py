"""Apply probe reductions to sites as a backend produces them, one batch at a time."""

from __future__ import annotations

import numpy as np
import torch

from ..models import ModelHandle
from .catalog import BatchContext, Probe


class BatchCollector:
    """Receives ``(site, layer, tensor)`` from a backend and keeps only the probes' reductions."""

    def __init__(self, handle: ModelHandle, probes: list[Probe], ctx: BatchContext):
        self.handle = handle
        self.ctx = ctx
        self.by_site: dict[str, list[Probe]] = {}
        for probe in probes:
            self.by_site.setdefault(probe.site, []).append(probe)
        self.per_layer: dict[str, dict[int, np.ndarray]] = {}
        self.global_vars: dict[str, np.ndarray] = {}

    @property
    def sites(self) -> set[str]:
        return set(self.by_site)

    def __call__(self, site: str, layer: int | None, tensor: torch.Tensor) -> None:
        for probe in self.by_site.get(site, ()):
            for name, value in probe.reduce(tensor.detach(), self.ctx, layer).items():
                value = value.cpu()
                value = value.numpy() if not value.is_floating_point() else value.float().numpy()
                if layer is None:
                    self.global_vars[name] = value
                else:
                    self.per_layer.setdefault(name, {})[layer] = value

    def stacked(self, variable_dims: dict[str, tuple[str, ...]], n_layers: int) -> dict[str, np.ndarray]:
        """All variables of the batch, per-layer ones stacked on the axis where ``layer`` sits."""
        out = dict(self.global_vars)
        for name, layers in self.per_layer.items():
            missing = sorted(set(range(n_layers)) - set(layers))
            if missing:
                raise RuntimeError(f"backend produced no {name!r} for layers {missing}")
            # the reduction's output lacks the layer dim (and the sample dim is the batch)
            axis = variable_dims[name].index("layer")
            out[name] = np.stack([layers[i] for i in range(n_layers)], axis=axis)
        return out


def w_o_gram_getter(handle: ModelHandle):
    """layer -> W_O^h^T W_O^h for every head, (head, d_h, d_h), cached; read from the HF weights."""
    cache: dict[int, torch.Tensor] = {}

    def get(layer: int) -> torch.Tensor:
        if layer not in cache:
            w_o = handle.hf_model.model.layers[layer].self_attn.o_proj.weight  # (d_model, head * d_h)
            per_head = w_o.float().reshape(w_o.shape[0], handle.n_heads, handle.head_dim)  # (d, h, e)
            cache[layer] = torch.einsum("dhe,dhf->hef", per_head, per_head)
        return cache[layer]

    return get
