"""Next-token law (He & Su), streamed least squares, future-token probes: known answers and independent fits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.linear_model import LinearRegression

from workbench.analyses.linear_readout import ReadoutStats, UnstableFitWarning, check_enough_tokens
from workbench.analyses.next_token_law import future_token_probes, law_fit, prediction_residuals, split_windows
from workbench.corpus import paragraphs
from workbench.probes.streaming import fresh_norm, stream_layer_features, token_windows


def _geometric_features(rho: float, pr_first: float, n_layers: int, n: int = 2000, d: int = 3, seed: int = 0):
    """Features whose least-squares PR is exactly pr_first * rho^(l-1): x_l = [y + c_l u, junk],
    with u orthogonal to 1, y and the junk columns, ||u|| = ||y - ybar||, so PR_l = c_l^2 / (1 + c_l^2)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, d + 1))
    raw -= raw.mean(0)
    q, _ = np.linalg.qr(raw)  # orthonormal, each column orthogonal to 1
    y, u, junk = q[:, 0] * 10 + 5, q[:, 1] * 10, q[:, 2:]
    feats = []
    for layer in range(n_layers):
        pr = pr_first * rho**layer
        c = np.sqrt(pr / (1 - pr))
        feats.append(np.column_stack([y - 5 + c * u, junk]))
    return feats, y


def test_streamed_stats_give_the_known_geometric_pr_and_law():
    feats, y = _geometric_features(rho=0.8, pr_first=0.9, n_layers=6)
    pr = []
    for x in feats:
        stats = ReadoutStats(x.shape[1], n_targets=1)
        for chunk in np.array_split(np.arange(len(y)), 7):  # streamed in uneven batches
            stats.add(torch.from_numpy(x[chunk]), torch.from_numpy(y[chunk, None]))
        fit = stats.fit()
        pr.append(stats.residual_sum_of_squares(fit)[0] / stats.total_sum_of_squares()[0])
    expected = 0.9 * 0.8 ** np.arange(6)
    np.testing.assert_allclose(pr, expected, rtol=1e-9)
    law = law_fit(xr.DataArray(pr, dims="layer"))
    assert law.rho.item() == pytest.approx(0.8, rel=1e-9)
    assert law.pearson_r.item() == pytest.approx(-1.0, abs=1e-12)
    assert law.pr_ratio.item() == pytest.approx(0.8**5, rel=1e-9)
    np.testing.assert_allclose(law.contribution_share.values[1:], 0.2, rtol=1e-9)  # equal learning
    assert np.isnan(law.contribution.values[0])


def test_readout_matches_sklearn_and_held_out_rss():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)) * [1, 10, 0.1, 1, 1, 5, 1, 1] + 3
    y = x @ rng.normal(size=(8, 2)) + rng.normal(size=(500, 2)) + 7
    train, test = ReadoutStats(8, 2), ReadoutStats(8, 2)
    train.add(torch.from_numpy(x[:400]), torch.from_numpy(y[:400]))
    test.add(torch.from_numpy(x[400:]), torch.from_numpy(y[400:]))
    fit = train.fit()
    ref = LinearRegression().fit(x[:400], y[:400])
    np.testing.assert_allclose(fit.weight, ref.coef_.T, rtol=1e-8)
    np.testing.assert_allclose(fit.bias, ref.intercept_, rtol=1e-8)
    held_out = ((y[400:] - ref.predict(x[400:])) ** 2).sum(0)
    np.testing.assert_allclose(test.residual_sum_of_squares(fit), held_out, rtol=1e-8)


def test_one_hot_classes_equal_dense_one_hot_regression():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5))
    labels = rng.integers(-1, 4, size=300)  # -1: no class (all-zero row)
    dense = np.stack([(labels == c).astype(float) for c in range(4)], 1)
    stats = ReadoutStats(5, n_targets=0, n_classes=4)
    stats.add(torch.from_numpy(x), labels=torch.from_numpy(labels))
    fit = stats.fit()
    ref = LinearRegression().fit(x, dense)
    np.testing.assert_allclose(fit.weight, ref.coef_.T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(stats.residual_sum_of_squares(fit), ((dense - ref.predict(x)) ** 2).sum(0), rtol=1e-8)


def test_label_sets_share_one_gram_and_equal_separate_fits():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(400, 6)))
    labels = torch.from_numpy(rng.integers(-1, 3, size=(400, 2)))
    joint = ReadoutStats(6, n_classes=3, label_sets=2)
    joint.add(x, labels=labels)
    for block in range(2):
        alone = ReadoutStats(6, n_classes=3)
        alone.add(x, labels=labels[:, block])
        cols = slice(3 * block, 3 * block + 3)
        np.testing.assert_allclose(joint.fit().weight[:, cols], alone.fit().weight, rtol=1e-10)
        np.testing.assert_allclose(joint.residual_sum_of_squares(joint.fit())[cols],
                                   alone.residual_sum_of_squares(alone.fit()), rtol=1e-10)
    assert joint.fit().solver == "cholesky"


def test_singular_features_use_min_norm_lstsq_and_ridge_is_recorded():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 2))
    x = np.column_stack([a, a[:, 0] + a[:, 1], np.zeros(200)])  # rank 2 of 4
    y = a @ [1.0, -2.0] + 0.1 * rng.normal(size=200)
    stats = ReadoutStats(4, 1)
    stats.add(torch.from_numpy(x), torch.from_numpy(y[:, None]))
    fit = stats.fit()
    assert "min-norm" in fit.solver and fit.rank == 2
    assert np.isfinite(fit.weight).all()
    ref = LinearRegression().fit(x, y)
    rss = ((y - ref.predict(x)) ** 2).sum()
    assert stats.residual_sum_of_squares(fit)[0] == pytest.approx(rss, rel=1e-8)
    ridge = stats.fit(ridge=0.1)
    assert ridge.solver.startswith("ridge") and np.isfinite(ridge.weight).all()


def test_too_few_tokens_warns_with_the_number_needed():
    with pytest.warns(UnstableFitWarning, match="at least 2304 tokens"):
        check_enough_tokens(100, 576)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_enough_tokens(5000, 576)


def test_law_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="layer"):
        law_fit(xr.DataArray([0.5, 0.4, 0.3], dims="x"))
    with pytest.raises(ValueError, match="NaN"):
        law_fit(xr.DataArray([0.5, np.nan, 0.3], dims="layer"))


def test_split_windows_is_seeded_and_disjoint():
    windows = [[i, i + 1] for i in range(10)]
    train, test = split_windows(windows, 0.2, seed=0)
    assert len(test) == 2 and len(train) == 8
    assert not {tuple(w) for w in train} & {tuple(w) for w in test}
    assert split_windows(windows, 0.2, seed=0) == (train, test)
    with pytest.raises(ValueError):
        split_windows(windows, 1.0, 0)


def test_features_follow_he_and_su_and_equal_hf_hidden_states(tiny):
    """Block outputs through a fresh unit norm; the last block = HF's hidden_states[-1] (trained final norm)."""
    text = paragraphs()[0]
    windows = token_windows(tiny, [text], window=64)
    got = {}
    stream_layer_features(tiny, windows[:1], lambda b: got.__setitem__(b.layer, b.features.clone()), progress=False)
    ids = torch.tensor([windows[0]])
    with torch.no_grad():
        hidden = tiny.hf_model(ids, output_hidden_states=True).hidden_states
    norm = fresh_norm(tiny)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for layer in range(tiny.n_layers - 1):
        torch.testing.assert_close(got[layer], norm(hidden[layer + 1][0]), rtol=0, atol=0)
    torch.testing.assert_close(got[tiny.n_layers - 1], hidden[-1][0], rtol=0, atol=0)


def _features_in_memory(model, windows):
    feats, nxt = {}, {}

    def keep(b):
        m = b.targets[:, 0] >= 0
        feats.setdefault(b.layer, []).append(b.features[m].double().numpy())
        if b.layer == 0:
            nxt.setdefault(0, []).append(b.targets[m, 0].numpy())

    stream_layer_features(model, windows, keep, progress=False)
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(nxt[0]).astype(np.float64)


@pytest.mark.real
def test_streamed_pr_equals_sklearn_on_stored_smollm2_features(smollm2):
    texts = paragraphs()[:24]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableFitWarning)
        ds = prediction_residuals(smollm2, texts, targets=("token_id",), heldout=0.0, window=128, progress=False)
    windows = token_windows(smollm2, texts, 128)
    feats, y = _features_in_memory(smollm2, windows)
    assert ds.n_tokens.sel(split="train").item() == len(y)
    for layer in (0, 7, 29):
        x = feats[layer]
        pred = LinearRegression().fit(x, y).predict(x)
        ref = ((y - pred) ** 2).mean() / y.var()
        assert ds.pr.sel(layer=layer, target="token_id", split="train").item() == pytest.approx(ref, rel=1e-6)


def test_prediction_residuals_and_probes_end_to_end_on_tiny(tiny):
    texts = paragraphs()[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableFitWarning)
        ds = prediction_residuals(tiny, texts, targets=("token_id", "shuffled_id", "one_hot"), one_hot_classes=32,
                                  window=128, progress=False)
        probes = future_token_probes(tiny, texts, horizon=3, n_classes=32, window=128, progress=False)
    assert ds.pr.dims == ("layer", "target", "split")
    assert np.isfinite(ds.pr.values).all()
    assert (ds.pr.sel(split="train") <= 1 + 1e-9).all()  # in-sample OLS never beats the mean by less than 0
    assert ds.n_tokens.sel(split="test").item() > 0
    assert probes.accuracy.dims == ("layer", "k") and list(probes.k.values) == [1, 2, 3]
    assert ((probes.accuracy >= 0) & (probes.accuracy <= probes.coverage)).all()
    with pytest.raises(ValueError, match="unknown target"):
        prediction_residuals(tiny, texts, targets=("ids",))
    with pytest.raises(ValueError, match="no window"):
        prediction_residuals(tiny, [""], progress=False)


def test_prediction_residuals_warns_when_tokens_are_few(tiny):
    with pytest.warns(UnstableFitWarning):
        prediction_residuals(tiny, [paragraphs()[0]], targets=("token_id",), heldout=0.0, progress=False)


def test_study_saves_summarises_and_draws_from_saved_files(tiny, tmp_path):
    from workbench.studies import next_token_law as study
    from workbench.studies.tables import markdown_table

    folder = study.run_study(tiny, tmp_path / "tiny", tokens=3000, probe_tokens=3000, lens_tokens=600, lens_steps=1,
                             progress=False)
    assert not (tmp_path / "tiny.partial").exists()
    from workbench.studies.registry import STUDIES

    asked = {"tokens": 3000, "probe_tokens": 3000, "lens_tokens": 600, "lens_steps": 1}
    assert STUDIES["next-token-law"].options_changed(folder, asked) == ""  # recorded with the results
    assert STUDIES["next-token-law"].options_changed(folder, {**asked, "lens_steps": 20}) == "lens_steps=1"
    with pytest.raises(FileExistsError, match="recompute"):
        study.run_study(tiny, folder, progress=False)
    row = study.summary(folder)
    assert row["layers"] == 2 and row["solver"] in ("cholesky", "lstsq")
    assert "tiny-random-llama" in markdown_table([row])
    lens = study.load_tuned_lens(folder)
    lens.check_model(tiny)
    written = study.write_figures({"tiny": folder}, tmp_path / "gallery", formats=("svg",))
    names = {p.relative_to(tmp_path / "gallery").as_posix() for p in written}
    assert {"law.svg", "tiny/contributions.svg", "tiny/future_token_probes.svg",
            "tiny/logit_vs_tuned_lens.svg", "tiny/tuned_lens_cross_entropy.svg"} <= names
