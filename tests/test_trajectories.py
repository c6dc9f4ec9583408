"""Lines of thought (Sarfati et al.): trajectory SVD, truncation KL, linear drift + noise fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.decomposition import PCA

from workbench.analyses import trajectories
from workbench.analyses.trajectories import chunk_windows, fit_linear_drift, trajectory_svd, truncation_kl
from workbench.corpus import paragraphs
from workbench.probes import hooks
from workbench.probes.lens import lens_logits
from workbench.probes.sites import RESID_POST, RESID_PRE

torch.set_num_threads(1)


def capture_last_token(handle, chunks) -> xr.DataArray:
    """The last token's residual stream at every layer boundary: (trajectory, layer, d_model), n_layers + 1 layers."""
    n = handle.n_layers
    ids = torch.tensor(chunks)
    out = torch.zeros(len(chunks), n + 1, handle.d_model)

    def on_site(site, layer, tensor):
        out[:, layer if site == RESID_PRE else n] = tensor[:, -1].float()

    reads = [(RESID_PRE, l) for l in range(n)] + [(RESID_POST, n - 1)]
    hooks.forward(handle, ids, reads=reads, on_site=on_site, logits=False)
    return xr.DataArray(out.numpy(), dims=("trajectory", "layer", "d_model"), coords={"layer": np.arange(n + 1)})


def corpus_chunks(handle, n, length):
    ids = []
    for text in paragraphs():
        ids += handle.tokenizer(text)["input_ids"]
        if len(ids) >= n * length:
            break
    return chunk_windows(ids, length, n)


def linear_trajectories(n=400, d=8, steps=5, sigma=0.01, seed=1):
    rng = np.random.default_rng(seed)
    a, b = 0.3 * rng.standard_normal((d, d)) / np.sqrt(d), 0.5 * rng.standard_normal(d)
    x = [rng.standard_normal((n, d))]
    noise = sigma * rng.standard_normal((steps, n, d))
    for t in range(steps):
        x.append(x[-1] + x[-1] @ a.T + b + noise[t])
    states = np.stack(x, axis=1)
    updates = np.diff(states, axis=1)
    ratio = np.median(np.linalg.norm(noise, axis=2).T / np.linalg.norm(updates, axis=2), axis=0)
    return states, ratio


def test_chunk_windows():
    assert chunk_windows(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert chunk_windows(list(range(10)), 3, n=2) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="concatenate more text"):
        chunk_windows([1, 2], 3)
    with pytest.raises(ValueError, match="fewer chunks"):
        chunk_windows(list(range(10)), 3, n=4)


def test_linear_drift_recovered():
    states, ratio = linear_trajectories()
    fit = fit_linear_drift(states, train_fraction=0.8, ridge=1e-6)
    assert fit.sizes["layer"] == 5 and list(fit["to_layer"].values) == [1, 2, 3, 4, 5]
    err = fit["linear_drift"].sel(metric="relative_error").values
    np.testing.assert_allclose(err, ratio, rtol=0.25)  # held-out error ~ the noise level
    assert (err < 0.1 * fit["mean_update"].sel(metric="relative_error")).all()
    np.testing.assert_allclose(fit["no_update"].sel(metric="relative_error"), 1.0)
    assert (fit["linear_drift"].sel(metric="r2") > 0.99).all()
    assert (fit["no_update"].sel(metric="r2") < fit["linear_drift"].sel(metric="r2")).all()
    assert (np.abs(fit["mean_update"].sel(metric="r2")) < 0.05).all()
    np.testing.assert_allclose(fit["noise_std"], 0.01, rtol=0.1)
    low_rank = fit_linear_drift(states, rank=8)  # rank = d: same fit
    np.testing.assert_allclose(low_rank["linear_drift"], fit_linear_drift(states)["linear_drift"], rtol=1e-6)


def test_svd_of_exact_subspace():
    rng = np.random.default_rng(0)
    n, layers, d = 60, 4, 12
    basis = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # (3, d)
    states = 5.0 + np.einsum("nlk,kd->nld", rng.standard_normal((n, layers, 3)), basis)
    svd = trajectory_svd(states)
    np.testing.assert_allclose(svd["cumulative_explained"].isel(component=2), 1.0, atol=1e-12)
    assert (svd["explained_variance_ratio"].isel(component=slice(3, None)) < 1e-20).all()
    assert (svd["components_99"] == 3).all() and (svd["components_90"] <= 3).all()
    np.testing.assert_allclose(svd["mean_norm"], np.linalg.norm(states.mean(0), axis=1))


@pytest.mark.parametrize("n", [50, 6])
def test_svd_matches_numpy_and_sklearn(n):
    rng = np.random.default_rng(n)
    d = 10
    states = rng.standard_normal((n, 3, d)) * np.logspace(0, -1, d) + rng.standard_normal(d)
    lazy = xr.DataArray(states, dims=("trajectory", "layer", "d_model")).chunk({"layer": 1})
    svd = trajectory_svd(lazy)
    k = min(n, d)
    assert svd.sizes["component"] == k
    for l in range(3):
        x = states[:, l]
        np.testing.assert_allclose(svd["singular_value"][l], np.linalg.svd(x - x.mean(0), compute_uv=False)[:k],
                                   rtol=1e-10, atol=1e-12)
        pca = PCA(n_components=k, svd_solver="full").fit(x)
        np.testing.assert_allclose(svd["explained_variance_ratio"][l], pca.explained_variance_ratio_, atol=1e-12)
        np.testing.assert_allclose(svd["total_variance"][l], x.var(0, ddof=1).sum())


def test_errors_before_work(tiny):
    states, _ = linear_trajectories(n=20)
    with pytest.raises(ValueError, match="at least 4"):
        trajectory_svd(states[:3])
    bad = states.copy()
    bad[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_linear_drift(bad)
    with pytest.raises(ValueError, match="need >= 2 each"):
        fit_linear_drift(states[:5], train_fraction=0.9)
    with pytest.raises(ValueError, match="dims"):
        trajectory_svd(xr.DataArray(states, dims=("a", "b", "c")))
    real = np.random.default_rng(0).standard_normal((8, 3, tiny.d_model))
    with pytest.raises(ValueError, match="out of range"):
        truncation_kl(tiny, real, [1], layer=3)
    with pytest.raises(ValueError, match="ranks"):
        truncation_kl(tiny, real, [1, tiny.d_model + 1])
    with pytest.raises(ValueError, match="wrong model"):
        truncation_kl(tiny, states, [1])


def test_truncation_kl_tiny(tiny):
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, tiny.tokenizer.vocab_size, (80, 8)).tolist()
    states = capture_last_token(tiny, chunks)
    d = tiny.d_model
    out = truncation_kl(tiny, states, [1, 4, 16, d], batch_size=32)
    kl = out["kl_mean"].values
    assert np.isfinite(out["kl"]).all() and kl[-1] < 1e-6 and kl[-1] < kl[0] and kl[0] > 0
    assert out["top1_agreement"].sel(rank=d) == 1.0
    np.testing.assert_allclose(out["explained"].sel(rank=d), 1.0)
    assert out.sizes["trajectory"] == 80 and out["kl_quantile"].dims == ("rank", "quantile")
    first = truncation_kl(tiny, states, [d], layer=0)  # any layer, through the same unembedding
    assert first["kl_mean"].item() < 1e-6 and first.attrs["layer"] == 0


def test_smollm2_lines_of_thought(smollm2):
    chunks = corpus_chunks(smollm2, 24, 32)
    states = capture_last_token(smollm2, chunks)
    assert states.sizes["layer"] == smollm2.n_layers + 1
    with torch.no_grad():
        hf = smollm2.hf_model(input_ids=torch.tensor(chunks), use_cache=False).logits[:, -1]
        ours = lens_logits(smollm2, torch.as_tensor(states.isel(layer=-1).values))
    torch.testing.assert_close(ours.float(), hf.float(), atol=1e-3, rtol=1e-4)

    svd = trajectory_svd(states)
    assert np.isfinite(svd["singular_value"]).all() and (svd["components_90"] >= 1).all()
    assert (svd["components_90"] <= 23).all()  # 24 centred states span at most 23 directions
    out = truncation_kl(smollm2, states, [1, 4, 16, smollm2.d_model])
    assert np.isfinite(out["kl"]).all() and out["kl_mean"].sel(rank=smollm2.d_model) < 1e-5
    assert out["kl_mean"].sel(rank=1) > out["kl_mean"].sel(rank=16)
    assert out["top1_agreement"].sel(rank=smollm2.d_model) == 1.0
    fit = fit_linear_drift(states, rank=8)
    assert all(np.isfinite(fit[m]).all() for m in ("linear_drift", "no_update", "mean_update", "noise_std"))


def test_bundle_view_is_the_pooled_pca():
    """Hand-built: states in a 3-D subspace keep every pairwise distance in the view; independent: sklearn's PCA
    on the pooled states gives the same coordinates up to each axis's sign."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    states = rng.normal(size=(12, 5, 3)) @ rng.normal(size=(3, 16))  # (trajectory, layer, d_model)
    view = trajectories.bundle_view(states).values
    flat, pooled = view.reshape(-1, 3), states.reshape(-1, 16)
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(flat), dist(pooled), atol=1e-9)
    ref = PCA(3).fit_transform(pooled)
    np.testing.assert_allclose(np.abs(flat), np.abs(ref), atol=1e-8)
