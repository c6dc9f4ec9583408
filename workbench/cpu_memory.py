"""Large CPU buffers reused from the heap instead of fresh memory maps (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB, however it adapts) with a
fresh memory map and unmaps it on free. An eager-attention forward pass allocates several
(batch, heads, query, key) tensors per layer (75 MB each for 8 x 512 tokens of SmolLM2), so
every layer of every pass faults its pages in again, and the kernel zeroes each page first. Raising
the threshold and the trim threshold keeps those buffers in the heap, where the next layer reuses
them. ``benchmarks/cpu_allocator.py`` times the plain forward pass both ways, side by side.

The price: memory freed by the process stays resident (up to the peak, and reused), instead of
going back to the operating system. :func:`keep_large_buffers` is called by ``load_model`` for
models it places on the CPU and tunes only with ``WORKBENCH_KEEP_CPU_BUFFERS=1`` in the environment:
it is opt-in until the explorers' figures are shown to draw when their background work finishes
this much sooner (a clean-clone test run with it on by default had the extreme-token explorer's
pattern and bar figures stay empty in the browser test, which passed when rerun alone).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIMIT = 1 << 30  # buffers up to 1 GiB come from the heap; up to 1 GiB free at its top is kept
_applied: bool | None = None


def keep_large_buffers() -> bool:
    """Tune glibc's malloc once per process if ``WORKBENCH_KEEP_CPU_BUFFERS=1`` (module docstring); whether it is in effect."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("WORKBENCH_KEEP_CPU_BUFFERS", "0") == "1" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT))
            except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
                _applied = False
    return _applied
