"""Token geometry over runs: hand-built clouds with known answers, saved runs read lazily, real-model checks
against sklearn. (The estimators themselves are tested in ``test_intrinsic_dimension.py``.)"""

import numpy as np
import pytest
import xarray as xr
from sklearn.metrics.pairwise import cosine_similarity

import workbench as wb
from workbench.analyses import intrinsic_dimension as idm
from workbench.analyses import token_geometry as tg
from workbench.corpus import paragraphs
from workbench.runs import open_run


def _run(states: np.ndarray, valid=None) -> xr.Dataset:
    """A run-shaped dataset from (sample, pos, depth, d): resid_pre = depths 0..L-1, resid_post[L-1] = depth L."""
    s, p, n_depth, _ = states.shape
    dims = ("sample", "pos", "layer", "d_model")
    post = states[:, :, 1:]
    valid = np.ones((s, p), bool) if valid is None else valid
    return xr.Dataset({"resid_pre": (dims, states[:, :, :-1]), "resid_post": (dims, post)},
                      coords={"valid": (("sample", "pos"), valid), "sample": np.arange(s), "pos": np.arange(p),
                              "layer": np.arange(n_depth - 1)})


def test_shuffle_blocks_hand_built():
    rng = np.random.default_rng(0)
    ids = list(range(16))
    assert tg.shuffle_blocks(ids, 0, rng) == ids
    one = tg.shuffle_blocks(ids, 1, rng)  # 4 blocks of 4, order permuted, each block intact
    blocks = [one[i : i + 4] for i in range(0, 16, 4)]
    assert sorted(blocks) == [ids[i : i + 4] for i in range(0, 16, 4)]
    full = tg.shuffle_blocks(ids, 5, np.random.default_rng(1))  # 1024 blocks > 16 tokens: every token moves freely
    assert sorted(full) == ids and full != ids
    with pytest.raises(ValueError, match=">= 0"):
        tg.shuffle_blocks(ids, -1, rng)


def test_depths_stack_pre_and_last_post():
    states = np.arange(2 * 3 * 4 * 2, dtype=float).reshape(2, 3, 4, 2)
    np.testing.assert_array_equal(tg.residual_depths(_run(states)).values, states)


def test_known_clouds():
    """Depth 0: a 3-D Gaussian in 10 dims; depth 1: the same points scaled (neighbours kept: overlap 1, cosines
    unchanged); depth 2: other points in place of each (a random permutation: neighbourhoods scrambled)."""
    rng = np.random.default_rng(0)
    n, d = 400, 10
    base = np.zeros((n, d))
    base[:, :3] = rng.normal(size=(n, 3))
    base[:, 3:] += rng.normal(scale=1e-6, size=(n, d - 3))
    shuffled = base[rng.permutation(n)]
    states = np.stack([base, 3 * base, shuffled], axis=1)[None]
    g = tg.token_geometry(_run(states), max_rank=32, progress=False).isel(sample=0)
    assert abs(float(g.id.sel(depth=0, scale=2)) - 3) < 0.5
    assert float(g.overlap.sel(depth=0, k=1)) == 1.0 and float(g.overlap.sel(depth=0, k=8)) == 1.0
    assert float(g.overlap.sel(depth=1, k=8)) < 0.1
    assert np.isnan(g.overlap.sel(depth=2)).all()  # no next depth
    np.testing.assert_allclose(g.cosine_mean.sel(depth=0), g.cosine_mean.sel(depth=1))
    assert list(g.n_points.values) == [n, n, n] and list(g.n_duplicates.values) == [0, 0, 0]


def test_duplicates_removed_and_counted():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(60, 5))
    states = np.stack([np.concatenate([points, points[:10]]), rng.normal(size=(70, 5))], axis=1)[None]
    g = tg.token_geometry(_run(states), max_rank=8, progress=False).isel(sample=0)
    assert list(g.n_points.values) == [60, 70] and list(g.n_duplicates.values) == [10, 0]
    mean, _ = idm.cosine_similarity_stats(points)
    assert float(g.cosine_mean.sel(depth=0)) == pytest.approx(mean)


def test_bad_input_names_the_fix():
    states = np.random.default_rng(0).normal(size=(2, 20, 3, 4))
    with pytest.raises(ValueError, match="max_rank=16"):
        tg.token_geometry(_run(states), max_rank=32, progress=False)
    with pytest.raises(IndexError, match="depths 0..2"):
        tg.token_geometry(_run(states), max_rank=8, depths=[5], progress=False)
    with pytest.raises(KeyError, match="resid_pre"):
        tg.token_geometry(_run(states).drop_vars("resid_pre"), max_rank=8, progress=False)


def test_id_loss_correlation_known_order():
    ids = np.array([[3.0, 5.0], [4.0, 1.0], [5.0, 2.0], [6.0, 9.0], [7.0, 3.0]])  # (sample, depth)
    g = xr.Dataset({"id": (("sample", "depth", "scale"), ids[..., None])},
                   coords={"depth": [0, 1], "scale": [2], "sample": np.arange(5)})
    loss = xr.DataArray([1.0, 2.0, 3.0, 4.0, 5.0], dims="sample")
    corr = tg.id_loss_correlation(g, loss, n_resamples=200)
    assert float(corr.spearman.sel(depth=0)) == pytest.approx(1.0)
    assert float(corr.spearman.sel(depth=1)) == pytest.approx(0.2)  # 1 - 6 * 16 / (5 * 24)
    assert corr.ci_low.sel(depth=1) <= 0.2 <= corr.ci_high.sel(depth=1)
    with pytest.raises(ValueError, match="scale 4"):
        tg.id_loss_correlation(g, loss, scale=4)


def test_saved_run_gives_the_same_geometry(tiny, tmp_path):
    """Streamed to disk and read lazily (dask), one prompt at a time, on one worker thread or several at
    once: the same numbers as in memory."""
    windows = [list(np.random.default_rng(i).integers(10, 500, 40)) for i in range(3)]
    in_memory = wb.capture(tiny, windows, ["resid_pre", "resid_post", "logits"], progress=False)
    wb.capture(tiny, windows, ["resid_pre", "resid_post", "logits"], out=tmp_path / "run.zarr", progress=False)
    lazy = open_run(tmp_path / "run.zarr")
    a = tg.token_geometry(in_memory, max_rank=16, workers=1, progress=False)
    b = tg.token_geometry(lazy, max_rank=16, workers=3, progress=False)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    np.testing.assert_allclose(tg.prompt_loss(lazy), tg.prompt_loss(in_memory))


def test_real_model_cosine_and_loss_against_independent_code(smollm2):
    windows = [smollm2.tokenizer(t)["input_ids"][:70] for t in paragraphs()[:3]]
    run = wb.capture(smollm2, windows, ["resid_pre", "resid_post", "logits"], progress=False)
    g = tg.token_geometry(run, max_rank=32, depths=[0, 10, 30], progress=False)
    for depth in (0, 10, 30):
        cloud = tg.residual_depths(run).isel(sample=1).sel(depth=depth).values
        unique = np.unique(cloud, axis=0)
        sim = cosine_similarity(unique)[np.triu_indices(len(unique), 1)]
        assert float(g.cosine_mean.sel(sample=1, depth=depth)) == pytest.approx(sim.mean(), rel=1e-6)
        assert int(g.n_points.sel(sample=1, depth=depth)) == len(unique)
    assert np.isfinite(g.id.sel(depth=[10, 30])).all() and (g.id.sel(depth=[10, 30]) > 1).all()
    assert np.isnan(g.overlap).all()  # depths 0, 10, 30 are not consecutive
    loss = tg.prompt_loss(run)
    logp = run.next_token_logprob.isel(sample=0).values[: int(run.n_tokens[0]) - 1]
    assert float(loss[0]) == pytest.approx(-logp.mean(), rel=1e-6)
