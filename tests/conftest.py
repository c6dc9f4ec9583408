"""Shared fixtures: models are loaded once per test session."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

import workbench as wb

PROSE = [
    "The cat sat on the mat and looked out of the window at the rain.",
    "Attention sinks appear on the first token of almost every prompt.",
    "Hi!",
    "Élan vital — naïve café, 🙂 emoji and ünïcode text.",
]


@pytest.fixture(scope="session")
def tiny():
    return wb.load_model("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2():
    return wb.load_model()


@pytest.fixture(scope="session")
def gemma3():
    return wb.load_model("gemma3-270m")


def hf_forward(handle, texts):
    """Hugging Face's own outputs on the same right-padded batch the capture builds."""
    enc = [handle.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    pad = handle.tokenizer.pad_token_id or 0
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        out = handle.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                              use_cache=False)
    return out, ids, mask


@contextlib.contextmanager
def lock_held_elsewhere(path):
    """Another process holding the write lock of ``path`` (killed afterwards); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom workbench.locks import exclusive\n"
        f"with exclusive({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
