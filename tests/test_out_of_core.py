"""Analyses of a run larger than the memory they may use: computed block by block from the store.

The store is built by hand (no model: 48 samples x 256 positions x 16 layers x 512 dims of float32,
402 MB, with massive activations planted at known places) and written in the workbench's format.
A subprocess opens it lazily and runs the residual-peak and massive-activation analyses while its
peak RSS is measured (``ru_maxrss``): the growth must stay under a third of the store, and the
results must equal the same functions on the run loaded whole.
"""

import json
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.analyses.extreme_tokens import massive_activations, max_abs_activation
from workbench.analyses.residual_norms import residual_norm_peaks
from workbench.runs import write_zarr

N, W, L, D = 48, 256, 16, 512
PLANTED = [(5, 0, 7), (17, 0, 7), (30, 3, 100)]  # (sample, pos, dim): massive from layer 2 on

CHILD = """
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
import workbench as wb
from workbench.analyses.extreme_tokens import massive_activations, max_abs_activation
from workbench.analyses.residual_norms import residual_norm_peaks
run = wb.open_run(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peaks = residual_norm_peaks(run)
out = {"peak_pos": peaks.peak_pos.values.tolist(), "peak_ratio": peaks.peak_ratio.values.tolist()}
entries = massive_activations(run)
out["entries"] = [entries[k].values.tolist() for k in ("sample", "layer", "pos", "dim", "value")]
out["max_abs"] = max_abs_activation(run).values.tolist()
out["growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps(out))
"""


def _store(path, template: xr.Dataset):
    rng = da.random.RandomState(0)
    hidden = rng.standard_normal((N, W, L, D), chunks=(4, W, 1, D)).astype(np.float32)
    planted = np.zeros((N, W, L, D), dtype=bool)
    for s, p, d in PLANTED:
        planted[s, p, 2:, d] = True
    hidden = da.where(da.from_array(planted, chunks=(4, W, 1, D)), np.float32(3000.0), hidden)
    coords = {
        "sample": np.arange(N), "pos": np.arange(W), "layer": np.arange(L),
        "text": ("sample", np.array([f"text {i}" for i in range(N)])),
        "n_tokens": ("sample", np.full(N, W)),
        "token_id": (("sample", "pos"), np.ones((N, W), np.int64)),
        "token": (("sample", "pos"), np.full((N, W), "x")),
        "byte_start": (("sample", "pos"), np.zeros((N, W), np.int64)),
        "byte_end": (("sample", "pos"), np.ones((N, W), np.int64)),
        "valid": (("sample", "pos"), np.ones((N, W), bool)),
    }
    attrs = {**template.attrs, "n_layers": L, "d_model": D, "probes": "resid_pre"}
    ds = xr.Dataset({"resid_pre": (("sample", "pos", "layer", "d_model"), hidden)}, coords=coords, attrs=attrs)
    write_zarr(wb.validate_run(ds), path, chunks={"resid_pre": {"sample": 4, "layer": 1}})


@pytest.fixture(scope="module")
def big_store(tiny, tmp_path_factory):
    template = wb.capture(tiny, ["a"], ["resid_norm"], progress=False)
    path = tmp_path_factory.mktemp("big") / "big.zarr"
    _store(path, template)
    return path


@pytest.mark.slow
def test_analyses_of_a_run_larger_than_their_memory(big_store):
    path = big_store
    size = N * W * L * D * 4
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["growth"] < size / 3, f"peak RSS grew by {got['growth'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB run"

    whole = wb.open_run(path, lazy=False)
    peaks = residual_norm_peaks(whole)
    np.testing.assert_array_equal(got["peak_pos"], peaks.peak_pos.values)
    np.testing.assert_allclose(got["peak_ratio"], peaks.peak_ratio.values, rtol=1e-12)
    entries = massive_activations(whole)
    for k, values in zip(("sample", "layer", "pos", "dim", "value"), got["entries"]):
        np.testing.assert_array_equal(values, entries[k].values)
    np.testing.assert_allclose(got["max_abs"], max_abs_activation(whole).values)
    # the planted entries, and nothing else, are massive (|a| = 3000 > 100 and > 1000 x median |N(0,1)|)
    found = {(int(s), int(p), int(d)) for s, p, d in zip(entries["sample"].values, entries["pos"].values,
                                                       entries["dim"].values)}
    assert found == set(PLANTED) and len(entries["entry"]) == len(PLANTED) * (L - 2)


@pytest.mark.slow
def test_analyses_run_on_a_dask_cluster_with_less_memory_than_the_run(big_store):
    """The documented pattern: a dask.distributed Client (here a LocalCluster whose one worker may use
    400 MB, less than the 402 MB run plus its own imports) runs the analyses' chunked work."""
    distributed = pytest.importorskip("dask.distributed")
    whole = wb.open_run(big_store, lazy=False)
    expected_peaks = residual_norm_peaks(whole)
    expected_max = max_abs_activation(whole).values
    del whole
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, memory_limit="400MB", processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        run = wb.open_run(big_store)
        peaks = residual_norm_peaks(run)
        np.testing.assert_array_equal(peaks.peak_pos.values, expected_peaks.peak_pos.values)
        np.testing.assert_allclose(peaks.peak_ratio.values, expected_peaks.peak_ratio.values, rtol=1e-12)
        np.testing.assert_allclose(max_abs_activation(run).values, expected_max)
        assert len(massive_activations(run)["entry"]) == len(PLANTED) * (L - 2)
