"""Streaming capture to disk: the same run as in memory, resumable after SIGKILL, never mixed up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.capture_store import PROGRESS_FILE, staging_path
from workbench.runs import RunExistsError

from .conftest import PROSE

PROBES = ["resid_pre", "resid_post", "attn_received", "value_norm", "logits"]
TEXTS = [f"{i}: {t}" for i, t in enumerate(PROSE * 15)]  # 60 samples, 30 blocks of 2

SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
import workbench as wb
from tests.test_streaming import PROBES, TEXTS
model = wb.load_model("tiny-random-llama")
wb.capture(model, TEXTS, PROBES, batch_size=2, out=sys.argv[1], progress=False)
print("done", flush=True)
"""


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f":
        return np.array_equal(a, b, equal_nan=True)
    return np.array_equal(a, b)


def _assert_same_run(x, y):
    assert set(x.data_vars) == set(y.data_vars)
    for name in x.data_vars:
        assert _same(x[name].values, y[name].values), name
    for name in x.coords:
        assert _same(x[name].values, y[name].values), name


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _blocks_done(out: Path) -> int:
    try:
        return len(json.loads((staging_path(out) / PROGRESS_FILE).read_text())["done"])
    except (OSError, ValueError):
        return -1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted streamed run, and the in-memory capture of the same inputs."""
    model = wb.load_model("tiny-random-llama")
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    streamed = wb.capture(model, TEXTS, PROBES, batch_size=2, out=out, progress=False)
    memory = wb.capture(model, TEXTS, PROBES, batch_size=2, progress=False)
    return streamed.load(), memory


def test_streamed_run_equals_in_memory_run(reference):
    streamed, memory = reference
    for name in memory.data_vars:
        a, b = memory[name].values, streamed[name].values
        assert np.array_equal(np.isnan(a), np.isnan(b)) if a.dtype.kind == "f" else np.array_equal(a < 0, b < 0)
        if name != "top_k_ids":  # batches differ (global length order vs blocks): float rounding only
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in memory.coords:
        assert _same(memory[name].values, streamed[name].values), name
    assert streamed.sizes["sample"] == len(TEXTS)


def test_sigkill_at_several_moments_then_resume_equals_uninterrupted(reference, tmp_path):
    """Killed during model load, just after the store exists, and mid-way (usually during a block's
    write); each rerun continues; the finished store equals an uninterrupted run's, bit for bit."""
    out = tmp_path / "run.zarr"
    kills = []
    for wait_for_blocks in (None, 0, 8, 19):
        proc = _start(out)
        deadline = time.time() + 120
        if wait_for_blocks is None:
            time.sleep(0.5)  # still importing / loading the model
        else:
            while _blocks_done(out) < wait_for_blocks and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(_blocks_done(out))
        assert not out.exists()  # nothing at the target until the capture is complete
    assert max(kills) >= 8, kills  # the kills did land mid-way
    proc = _start(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "done" in stdout, stderr[-2000:]
    assert not staging_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.zarr.lock", "run.zarr"]  # no leftovers
    _assert_same_run(wb.open_run(out, lazy=False), reference[0])


def test_rerun_with_other_inputs_is_refused(tmp_path):
    model = wb.load_model("tiny-random-llama")
    out = tmp_path / "run.zarr"
    stage = staging_path(out)
    proc = _start(out)
    while _blocks_done(out) < 2 and proc.poll() is None:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(RunExistsError, match="unfinished capture of other inputs"):
        wb.capture(model, TEXTS[:10], PROBES, batch_size=2, out=out, progress=False)
    assert stage.exists()  # the other capture's work is kept
    run = wb.capture(model, TEXTS[:10], PROBES, batch_size=2, out=out, overwrite=True, progress=False)
    assert run.sizes["sample"] == 10 and not stage.exists()


def test_finished_run_is_not_overwritten_without_asking(tmp_path):
    model = wb.load_model("tiny-random-llama")
    out = tmp_path / "run.zarr"
    wb.capture(model, TEXTS[:4], ["resid_norm"], out=out, progress=False)
    with pytest.raises(RunExistsError, match="overwrite=True"):
        wb.capture(model, TEXTS[:6], ["resid_norm"], out=out, progress=False)
    again = wb.capture(model, TEXTS[:6], ["resid_norm"], out=out, overwrite=True, progress=False)
    assert again.sizes["sample"] == 6


def test_float16_residuals_and_bad_paths(tmp_path):
    model = wb.load_model("tiny-random-llama")
    run = wb.capture(model, TEXTS[:4], ["resid_pre", "value_norm"], residual_dtype="float16",
                     out=tmp_path / "half.zarr", progress=False)
    full = wb.capture(model, TEXTS[:4], ["resid_pre", "value_norm"], progress=False)
    assert run.resid_pre.dtype == np.float16 and run.value_norm.dtype == np.float32
    assert run.attrs["residual_dtype"] == "float16"
    np.testing.assert_allclose(run.resid_pre.values.astype(np.float32), full.resid_pre.values, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=r"\.zarr"):
        wb.capture(model, TEXTS[:4], ["resid_norm"], out=tmp_path / "run.h5")
    with pytest.raises(ValueError, match="float16"):
        wb.capture(model, TEXTS[:4], ["resid_norm"], residual_dtype="bfloat16")


def test_float16_overflow_is_an_error(tmp_path):
    model = wb.load_model("tiny-random-llama")
    with torch.no_grad():
        model.hf_model.model.embed_tokens.weight.mul_(1e6)  # residuals far beyond float16's 65504
    with pytest.raises(OverflowError, match="float32"):
        wb.capture(model, TEXTS[:2], ["resid_pre"], residual_dtype="float16", progress=False)


@pytest.mark.parametrize("bad", [None, {"a": "b"}, 42, b"bytes"])
def test_capture_refuses_what_is_not_texts(bad):
    model = wb.load_model("tiny-random-llama")
    with pytest.raises(TypeError, match="string or a list of strings"):
        wb.capture(model, bad)
