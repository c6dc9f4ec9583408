"""estimate_capture / `workbench plan`: sizes equal what the capture then holds; warnings say what to do."""

import math

import numpy as np

import workbench as wb
from workbench.capture_plan import estimate_capture

from .conftest import PROSE

TEXTS = PROSE * 3


def test_sizes_equal_the_captured_arrays(tiny):
    probes = ["resid_pre", "attn_pattern", "value_norm", "logits"]
    estimate = estimate_capture(tiny, TEXTS, probes, batch_size=4, time_one_batch=False)
    run = wb.capture(tiny, TEXTS, probes, batch_size=4, progress=False)
    assert estimate.bytes_by_variable == {name: run[name].nbytes for name in run.data_vars}
    assert estimate.tokens == int(run.n_tokens.sum()) and estimate.width == run.sizes["pos"]
    half = estimate_capture(tiny, TEXTS, ["resid_pre"], residual_dtype="float16", time_one_batch=False)
    assert half.bytes_by_variable["resid_pre"] * 2 == run.resid_pre.nbytes


def test_shared_residual_is_counted_once(tiny):
    estimate = estimate_capture(tiny, TEXTS, ["resid_pre", "resid_post"], time_one_batch=False)
    run = wb.capture(tiny, TEXTS, ["resid_pre", "resid_post"], progress=False)
    base = run.resid_pre.values.base
    while base is not None and base.base is not None:
        base = base.base
    assert estimate.disk_bytes == np.asarray(base).nbytes  # one (layer + 1)-deep array holds both


def test_time_is_extrapolated_from_one_batch(tiny):
    estimate = estimate_capture(tiny, TEXTS, ["resid_norm"], batch_size=4)
    assert math.isfinite(estimate.seconds) and estimate.seconds > 0
    assert "time: about" in estimate.report()


def test_warns_and_names_the_reduced_probe_when_it_will_not_fit(tiny, monkeypatch):
    import workbench.capture_plan as plan

    real = plan.os.sysconf
    monkeypatch.setattr(plan.os, "sysconf", lambda key: 1 if key == "SC_AVPHYS_PAGES" else real(key))
    estimate = estimate_capture(tiny, TEXTS, ["resid_pre", "attn_pattern"], time_one_batch=False)
    (warning,) = [w for w in estimate.warnings if "in memory" in w]
    assert "out=" in warning and "attn_received" in warning and "resid_norm" in warning
    streamed = estimate_capture(tiny, TEXTS, ["resid_pre"], out="x.zarr", time_one_batch=False)
    assert any("lower batch_size" in w for w in streamed.warnings)
