"""Torch thread settings for small models on few cores."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread inside the block, then restore the previous setting.

    A model this small is dominated by per-operation overhead: more intra-op threads only
    add synchronisation, and on a shared 2-core machine under load a forward pass measured
    30x slower with 2 threads than with 1 (1 ms vs 30 ms).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
