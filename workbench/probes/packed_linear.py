"""A model's linear layers run through oneDNN with weights packed once, for the small forward passes of token scoring.

Why hand-written (for speed): a byte-level walk scores a few token positions per forward pass (1-32 rows
in a sampled draw) and spends most of its time in the linear layers. PyTorch's dense
``F.linear`` on the CPU runs MKL's GEMM on the weights as stored, and for so few rows it is far
from both the memory and the compute limit of the machine. oneDNN's linear with the weights
reordered once into its blocked layout -- ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the kernels ``torch.compile``'s CPU backend emits for frozen weights --
computes the same products faster: ``benchmarks/packed_linear.py`` (SmolLM2-135M's 211 linear
layers, 2 threads on this project's 2-core machine) measured dense/packed time ratios of 1.20 (1
row), 1.52 (13), 1.53 (32), 1.22 (128) and 1.11 (512), and ``benchmarks/byte_queries.py`` a sampled
draw 3.61x the issue's code (2.79x before), with the same model calls and the same bytes.

The sums run in another order, so outputs differ from ``F.linear`` by float32 rounding (the
tests bound it against Hugging Face's own logits). Used only where it applies: a model on the CPU
in float32 with oneDNN available; anything else (GPU, float64 exactness checks, other builds)
runs unchanged. The packed copies (one more copy of the weights, tied embeddings included: about
0.5 GB for SmolLM2-135M) are kept on the handle while its weights stay as they are; set the
environment variable ``WORKBENCH_PACKED_LINEAR=0`` to run the dense layers instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch

_ROWS_HINT = 16  # the batch size the packing is tuned for; any number of rows works


def applies(handle) -> bool:
    """Whether :func:`packed_linears` changes anything for ``handle``: not switched off, CPU, float32, oneDNN's ops
    present, and no device map (accelerate wraps each module's ``forward`` itself)."""
    return (os.environ.get("WORKBENCH_PACKED_LINEAR", "1") != "0"
            and handle.device.type == "cpu" and handle.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not getattr(handle.hf_model, "hf_device_map", None)
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed(handle) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    state = handle._weights_state()
    cached = handle.__dict__.get("_packed_linears")
    if cached is None or cached[0] != state:
        with torch.no_grad():
            layers = [(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), _ROWS_HINT))
                      for m in handle.hf_model.modules()
                      if type(m) is torch.nn.Linear]
        cached = handle.__dict__["_packed_linears"] = (state, layers)
    return cached[1]


def _forward(packed: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y.reshape(*shape[:-1], y.shape[-1])


@contextmanager
def packed_linears(handle) -> Iterator[bool]:
    """Within the block, the handle's ``nn.Linear`` layers run on their packed weights; yields whether they do.

    Hold ``handle.lock`` around it (the modules are shared). Re-entrant: an inner block changes nothing.
    """
    if not applies(handle) or handle.__dict__.get("_packed_active"):
        yield bool(handle.__dict__.get("_packed_active"))
        return
    # a module whose forward someone else replaced since the packing (nnsight wraps every module it sees) keeps it
    layers = [(module, packed) for module, packed in _packed(handle) if "forward" not in module.__dict__]
    handle.__dict__["_packed_active"] = True
    try:
        for module, packed in layers:
            module.forward = partial(_forward, packed, module.bias)
        yield True
    finally:
        for module, _ in layers:
            module.__dict__.pop("forward", None)
        handle.__dict__["_packed_active"] = False
