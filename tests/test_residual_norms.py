"""Residual norms and peaks: hand-built answers, and the real model against HF hidden states."""

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.analyses import MissingProbeError, residual_norm_peaks, residual_norms

from .conftest import PROSE, hf_forward


def _hand_built_run():
    # 1 sample, 4 positions (last is padding), 2 layers, d_model 2
    resid = np.zeros((1, 4, 2, 2), dtype=np.float32)
    resid[0, :, 0] = [[3, 4], [0, 1], [0, 2], [9, 9]]  # norms 5, 1, 2, (padding)
    resid[0, :, 1] = [[30, 40], [1, 0], [0, 3], [9, 9]]  # norms 50, 1, 3
    resid[0, 3] = np.nan
    return xr.Dataset(
        {"resid_pre": (("sample", "pos", "layer", "d_model"), resid)},
        coords={
            "valid": (("sample", "pos"), np.array([[True, True, True, False]])),
            "token": (("sample", "pos"), np.array([["<s>", "a", "b", ""]])),
            "layer": [0, 1],
        },
    )


def test_norms_hand_built():
    norms = residual_norms(_hand_built_run())
    np.testing.assert_allclose(norms.isel(sample=0).values[:3], [[5, 50], [1, 1], [2, 3]])
    assert np.isnan(norms.isel(sample=0, pos=3)).all()


def test_peaks_hand_built():
    peaks = residual_norm_peaks(_hand_built_run())
    # layer 0: median of (5, 1, 2) = 2 -> first token 2.5x; layer 1: median(50, 1, 3) = 3 -> 50/3
    np.testing.assert_allclose(peaks.median_norm.isel(sample=0).values, [2.0, 3.0])
    np.testing.assert_allclose(peaks.peak_ratio.isel(sample=0).values, [2.5, 50 / 3])
    assert peaks.peak_pos.isel(sample=0).values.tolist() == [0, 0]
    assert peaks.peak_token.isel(sample=0, layer=1).item() == "<s>"


def test_norms_match_hf_hidden_states(smollm2):
    run = wb.capture(smollm2, PROSE[:2], ["resid_pre"], batch_size=2, progress=False)
    norms = residual_norms(run)
    order = sorted(range(2), key=lambda i: -int(run.n_tokens[i]))
    out, _, _ = hf_forward(smollm2, [PROSE[i] for i in order])
    for row, i in enumerate(order):
        n = int(run.n_tokens[i])
        for layer in (0, 15, 29):
            expected = out.hidden_states[layer][row, :n].double().norm(dim=-1).numpy()
            np.testing.assert_allclose(norms.isel(sample=i, pos=slice(0, n)).sel(layer=layer).values, expected, rtol=1e-6)


def test_smollm2_first_token_residual_peak(smollm2):
    """The real model shows the residual-state peak on the first token in the late layers."""
    run = wb.capture(smollm2, PROSE[:2], ["resid_pre"], progress=False)
    peaks = residual_norm_peaks(run)
    late = peaks.sel(layer=slice(14, 28))
    assert (late.peak_pos == 0).all()
    assert float(late.peak_ratio.min()) > 10


def test_missing_probe_names_the_probe(tiny):
    run = wb.capture(tiny, "hello", ["logits"], progress=False)
    with pytest.raises(MissingProbeError, match="probes=\\['resid_pre'") as err:
        residual_norms(run)
    assert "workbench capture --probes resid_pre" in str(err.value)


def test_norms_reduced_during_capture_equal_norms_of_stored_residuals(tiny):
    full = wb.capture(tiny, PROSE, ["resid_pre"], progress=False)
    reduced = wb.capture(tiny, PROSE, ["resid_norm"], progress=False)
    assert "resid_pre" not in reduced
    np.testing.assert_allclose(residual_norms(reduced).values, residual_norms(full).values, rtol=1e-5)
