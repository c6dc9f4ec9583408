"""Before a long capture: how many bytes on disk, how much memory, how long, and will it fit?

``estimate_capture(model, texts, probes)`` tokenises the texts (seconds, no forward pass over the
corpus), sizes every variable the run will hold from the schema's dims, and times one real
capture of the first batch to extrapolate the whole. ``workbench plan`` prints the same. The
estimate warns when the run would not fit in memory (stream it: ``out=...``), when the store
would not fit on the disk, and names the reduced probe that stores a summary instead of the
full tensor.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# a probe that stores full tensors -> the probe that stores what most analyses read from it
REDUCED = {"resid_pre": "resid_norm", "resid_post": "resid_norm", "attn_pattern": "attn_received",
           "attn_out": "resid_norm", "mlp_out": "resid_norm", "final_norm": "logits"}


@dataclass
class CaptureEstimate:
    samples: int
    tokens: int
    width: int
    bytes_by_variable: dict[str, int]
    in_memory_peak: int  # the run held in memory, plus the model and one batch's activations
    streamed_peak: int  # two blocks, plus the model and one batch's activations
    seconds: float
    available_memory: int
    free_disk: int | None
    warnings: list[str] = field(default_factory=list)

    @property
    def disk_bytes(self) -> int:
        """Uncompressed size of the run's variables (residuals are stored raw; patterns compress)."""
        return sum(self.bytes_by_variable.values())

    def report(self) -> str:
        lines = [f"{self.samples} samples, {self.tokens} tokens (longest {self.width}; runs are padded to it)",
                 f"run size: {_size(self.disk_bytes)}"]
        lines += [f"  {name:<20} {_size(n):>10}" for name, n in sorted(self.bytes_by_variable.items(),
                                                                        key=lambda kv: -kv[1])]
        lines += [f"peak memory in memory: {_size(self.in_memory_peak)}; streamed to disk (out=...): "
                  f"{_size(self.streamed_peak)}; available now: {_size(self.available_memory)}",
                  f"time: about {_duration(self.seconds)} (from one timed batch)"]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def estimate_capture(model, texts, probes, *, batch_size: int = 8, residual_dtype: str = "float32",
                     max_tokens: int | None = None, truncate: bool = False, out=None,
                     time_one_batch: bool = True) -> CaptureEstimate:
    """Size, memory and time of ``capture(model, texts, probes, ...)`` before running it."""
    from .capturing import capture, plan_capture

    plan = plan_capture(model, texts, probes, backend="torch", batch_size=batch_size, max_tokens=max_tokens,
                        truncate=truncate, top_k=5, add_special_tokens=True, residual_dtype=residual_dtype)
    sizes = plan.sizes()
    per_variable = {name: int(np.prod([sizes[d] for d in dims])) * np.dtype(plan.dtype(name)).itemsize
                    for name, dims in plan.variable_dims.items()}
    if plan.shared_residual:  # one (layer + 1)-deep array holds both
        per_variable["resid_post"] = per_variable["resid_pre"] // sizes["layer"]
    total = sum(per_variable.values())
    block = total * min(batch_size, len(plan.texts)) // len(plan.texts)
    weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    activations = _batch_activations(model, plan, batch_size)
    tokens = sum(len(ids) for ids, _ in plan.encoded)

    seconds = float("nan")
    if time_one_batch:
        first = plan.texts[:batch_size]
        start = time.perf_counter()
        capture(model, first, [p.name for p in plan.probes], batch_size=batch_size, residual_dtype=residual_dtype,
                max_tokens=max_tokens, truncate=truncate, progress=False)
        first_tokens = sum(len(ids) for ids, _ in plan.encoded[:batch_size])
        seconds = (time.perf_counter() - start) * tokens / first_tokens

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    folder = Path(out).expanduser().absolute().parent if out is not None else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free_disk = shutil.disk_usage(folder).free
    estimate = CaptureEstimate(len(plan.texts), tokens, plan.width, per_variable, total + weights + activations,
                               2 * block + weights + activations, seconds, available, free_disk)
    estimate.warnings = _warnings(estimate, plan, out)
    return estimate


def _batch_activations(model, plan, batch_size: int) -> int:
    """Bytes one forward pass of a batch holds at its peak (eager attention: the probabilities of one
    layer; the output logits when a probe reads them), float32."""
    b, w = min(batch_size, len(plan.texts)), plan.width
    attention = b * model.n_heads * w * w * 4 * 3  # scores, probabilities, a copy for the reduction
    hidden = b * w * max(model.d_model, getattr(model.config, "intermediate_size", 4 * model.d_model)) * 4 * 4
    logits = b * w * len(model.tokenizer) * 4 * 2 if "logits" in {p.name for p in plan.probes} else 0
    return attention + hidden + logits


def _warnings(estimate: CaptureEstimate, plan, out) -> list[str]:
    found = []
    full = [p.name for p in plan.probes if p.name in REDUCED]
    if out is None and estimate.in_memory_peak > estimate.available_memory:
        found.append(
            f"in memory this capture needs {_size(estimate.in_memory_peak)} but {_size(estimate.available_memory)} is "
            "available: stream it to disk (out='run.zarr', CLI --out run.zarr)"
            + (f", or store reduced probes instead of {', '.join(full)} "
               f"({', '.join(sorted({REDUCED[p] for p in full}))})" if full else "") + "."
        )
    if out is not None and estimate.streamed_peak > estimate.available_memory:
        found.append(f"even streamed, one batch needs {_size(estimate.streamed_peak)}: lower batch_size.")
    if estimate.free_disk is not None and estimate.disk_bytes > estimate.free_disk:
        advice = "residual_dtype='float16' halves residuals" if plan.residual_dtype == "float32" and full else ""
        reduced = (f"reduced probes ({', '.join(sorted({REDUCED[p] for p in full}))}) store summaries" if full
                   else "")
        found.append(f"the run needs {_size(estimate.disk_bytes)} on disk but {_size(estimate.free_disk)} is free"
                     + (": " + "; ".join(x for x in (advice, reduced) if x) if advice or reduced else "") + ".")
    return found


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: not timed
        return "not timed"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
