"""Next-token-law, lens and future-token figures, and the lens explorer, driven headless."""

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.analyses.lens import lens_statistics, lens_summary
from workbench.analyses.next_token_law import future_token_probes, law_fit
from workbench.plots import (
    contribution_figure,
    future_token_figure,
    law_figure,
    lens_comparison_figure,
    lens_heatmap,
    lens_top_k_figure,
)
from workbench.plots.next_token_law import show_token
from workbench.probes.lens import train_tuned_lens
from workbench.probes.streaming import token_windows
from workbench.widgets import LensExplorer

from .conftest import PROSE


def hand_built_pr(n_layers: int, rho: float, wobble: float = 0.0) -> xr.DataArray:
    depth = np.arange(n_layers)
    values = 0.8 * rho**depth * (1 + wobble * np.sin(depth))
    return xr.DataArray(values, dims=("layer",), coords={"layer": depth, "target": "token_id", "split": "test"})


@pytest.fixture(scope="module")
def run(tiny):
    return wb.capture(tiny, PROSE[:2], probes=["resid_post"], progress=False)


@pytest.fixture(scope="module")
def logit_stats(tiny, run):
    return lens_statistics(run, tiny, top_k=3)


@pytest.fixture(scope="module")
def tuned_stats(tiny, run):
    lens = train_tuned_lens(tiny, token_windows(tiny, PROSE * 8), max_tokens=256, steps=2, progress=False)
    return lens_statistics(run, tiny, lens, top_k=3)


def test_tokens_are_shown_quoted_and_cut():
    assert show_token(" the") == "' the'"
    assert show_token("\n") == "'\\n'"
    assert show_token("abcdefghijklmnop", 8) == "'abcdef…"


def test_law_figure_one_panel_per_model_with_fit_in_legend():
    prs = {"deep": hand_built_pr(30, 0.95), "shallow": hand_built_pr(18, 0.9, wobble=0.05)}
    fits = {name: (pr, law_fit(pr)) for name, pr in prs.items()}
    fig = law_figure(fits)
    assert [a.text for a in fig.layout.annotations] == ["deep", "shallow"]
    assert len(fig.data) == 4
    measured, line = fig.data[0], fig.data[1]
    np.testing.assert_array_equal(measured.x, np.arange(1, 31))  # l = 1..L, not the 0-based block index
    np.testing.assert_allclose(measured.y, prs["deep"].values)
    np.testing.assert_allclose(line.y, fits["deep"][1].fitted_pr.values)
    assert line.name == "fit: r=-1.000, ρ=0.950"
    shallow = fits["shallow"][1]
    assert fig.data[3].name == f"fit: r={float(shallow.pearson_r):.3f}, ρ={float(shallow.rho):.3f}"
    assert fig.data[2].xaxis == "x2" and fig.layout.xaxis2.title.text == "layer l = 1..L"
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.layout.title.text == "Next-token law (token_id, test)"
    single = law_figure({"deep": fits["deep"]})
    assert len(single.data) == 2 and not single.layout.annotations


def test_law_figure_asks_for_one_target_and_split():
    pr = xr.concat([hand_built_pr(5, 0.9), hand_built_pr(5, 0.8)], dim="split")
    with pytest.raises(ValueError, match="select one target and split"):
        law_figure({"m": (pr, law_fit(pr))})


def test_contribution_bars_and_equal_share_line():
    fit = law_fit(hand_built_pr(7, 0.9, wobble=0.2))
    fig = contribution_figure(fit)
    bars = fig.data[0]
    np.testing.assert_array_equal(bars.x, np.arange(2, 8))
    np.testing.assert_allclose(bars.y, fit.contribution_share.values[1:])
    assert not np.allclose(bars.y, bars.y[0])  # the wobble makes unequal shares
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(1 / 6)
    assert fig.layout.annotations[0].text == "dotted: equal share 1/(L-1) = 0.167"


def test_lens_heatmap_tokens_metric_and_top_k_hover(tiny, logit_stats):
    n = int(logit_stats.valid[0].sum())
    fig = lens_heatmap(logit_stats, sample=0, metric="cross_entropy", decode=tiny.tokenizer)
    heat = fig.data[0]
    np.testing.assert_allclose(heat.z, logit_stats.cross_entropy[0, :n].T.values)
    assert list(fig.layout.xaxis.ticktext) == [show_token(t) for t in logit_stats.token[0, :n].values]
    ids = logit_stats.top_k_ids.isel(sample=0, pos=3, layer=1).values
    probs = logit_stats.top_k_probs.isel(sample=0, pos=3, layer=1).values
    hover = heat.customdata[1][3][1]
    for i, p in zip(ids, probs):
        assert f"{show_token(tiny.tokenizer.decode([int(i)]), 24)} {p:.3f}" in hover
    assert heat.text[1][3] == show_token(tiny.tokenizer.decode([int(ids[0])]), 8)
    rank = lens_heatmap(logit_stats, 1, "final_top1_rank", positions=slice(0, 4), show_top1=False)
    np.testing.assert_allclose(rank.data[0].z, np.log10(1 + logit_stats.final_top1_rank[1, :4].T.values))
    assert rank.data[0].text is None and list(rank.data[0].x) == [0, 1, 2, 3]
    assert rank.data[0].customdata[0][0][1].startswith("'#")  # no decoder: ids shown as #id
    with pytest.raises(ValueError, match="unknown metric"):
        lens_heatmap(logit_stats, 0, "loss")


def test_long_prompt_heatmap_thins_labels(tiny):
    long_run = wb.capture(tiny, " ".join(PROSE * 3), probes=["resid_post"], progress=False)
    stats = lens_statistics(long_run, tiny, top_k=2)
    n = int(stats.valid[0].sum())
    assert n > 96
    fig = lens_heatmap(stats, 0)
    every = -(-n // 48)
    assert fig.data[0].text is None  # no per-cell labels when they could not be read
    assert list(fig.layout.xaxis.tickvals) == list(range(0, n, every))
    assert len(fig.layout.xaxis.ticktext) == len(fig.layout.xaxis.tickvals) <= 48


def test_lens_top_k_table_of_one_layer(tiny, logit_stats):
    fig = lens_top_k_figure(logit_stats, sample=1, layer=0, decode=tiny.tokenizer, positions=slice(2, 6))
    heat = fig.data[0]
    one = logit_stats.isel(sample=1, pos=slice(2, 6)).sel(layer=0)
    np.testing.assert_allclose(heat.z, one.top_k_probs.T.values)
    assert list(heat.x) == [2, 3, 4, 5] and list(heat.y) == [1, 2, 3]
    assert heat.text[2][0] == show_token(tiny.tokenizer.decode([int(one.top_k_ids[0, 2])]), 10)
    assert list(fig.layout.xaxis.ticktext) == [show_token(t) for t in one.token.values]
    assert fig.layout.title.text == "Logit lens at layer 0, sample 1"


def test_lens_comparison_and_future_token_figures(tiny, logit_stats, tuned_stats):
    logit, tuned = lens_summary(logit_stats), lens_summary(tuned_stats)
    fig = lens_comparison_figure(logit, tuned)
    assert [t.name for t in fig.data] == ["logit lens", "logit lens", "tuned lens", "tuned lens"]
    np.testing.assert_allclose(fig.data[0].y, logit.cross_entropy.values)
    np.testing.assert_allclose(fig.data[3].y, tuned.kl_to_final.values)
    assert [a.text for a in fig.layout.annotations] == ["cross-entropy (nats)", "KL(p_final || q_l) (nats)"]
    probes = future_token_probes(tiny, PROSE * 8, horizon=3, n_classes=32, progress=False)
    fig = future_token_figure(probes)
    np.testing.assert_allclose(fig.data[0].z, probes.accuracy.transpose("layer", "k").values)
    assert list(fig.data[0].x) == ["k=1", "k=2", "k=3"]
    np.testing.assert_allclose(fig.data[0].customdata[0], probes.coverage.values)
    np.testing.assert_allclose(np.asarray(fig.data[0].text, dtype=float), probes.accuracy.transpose("layer", "k").values,
                               atol=0.005)  # few layers: each cell labelled
    deep = probes.isel(layer=np.arange(probes.sizes["layer"]).repeat(7)).assign_coords(
        layer=np.arange(7 * probes.sizes["layer"]))
    assert future_token_figure(deep).data[0].text is None  # 30 rows: no numbers piled on each other


def test_lens_explorer_slider_selectors_lazy_tuned_and_export(tiny, logit_stats, tuned_stats, tmp_path):
    calls = []

    def tuned():
        calls.append("tuned")
        return tuned_stats

    stats = {("tiny", "logit"): logit_stats, ("tiny", "tuned"): tuned,
             ("one-prompt", "logit"): logit_stats.isel(sample=[1])}
    explorer = LensExplorer(stats, {"tiny": tiny.tokenizer}, positions_shown=5)
    assert calls == [] and explorer.lens.options == ("logit", "tuned")
    explorer.layer.value = 0
    at_0 = np.array(explorer.top_k.data[0].z, dtype=float)
    np.testing.assert_allclose(at_0, logit_stats.top_k_probs.isel(sample=0, pos=slice(0, 5), layer=0).T.values)
    explorer.layer.value = 1
    at_1 = np.array(explorer.top_k.data[0].z, dtype=float)
    np.testing.assert_allclose(at_1, logit_stats.top_k_probs.isel(sample=0, pos=slice(0, 5), layer=1).T.values)
    assert not np.allclose(at_0, at_1)
    assert explorer.top_k.layout.title.text == "tiny, logit lens, layer 1: top-k next tokens"
    assert explorer.overview.layout.shapes[0].y0 == 1  # the chosen layer is marked on the overview
    top1 = tiny.tokenizer.decode([int(logit_stats.top_k_ids[0, 0, 1, 0])])
    assert explorer.top_k.data[0].text[0][0] == show_token(top1, 10)
    explorer.start.value = 2
    assert list(explorer.top_k.data[0].x) == [2, 3, 4, 5, 6]
    explorer.sample.value = 1
    assert explorer.start.max == int(logit_stats.valid[1].sum()) - 5
    explorer.layer.value = 0
    explorer.lens.value = "tuned"
    explorer.lens.value = "logit"
    explorer.lens.value = "tuned"
    explorer.wait(30)
    assert calls == ["tuned"]  # computed once, when first shown
    assert (explorer.layer.value, explorer.sample.value, explorer.start.value) == (0, 1, 2)  # choices kept
    np.testing.assert_allclose(np.array(explorer.top_k.data[0].z, dtype=float),
                               tuned_stats.top_k_probs.isel(sample=1, layer=0, pos=slice(2, 7)).T.values)
    explorer.metric.value = "kl_to_final"
    assert "KL to final" in explorer.overview.layout.title.text
    explorer.model.value = "one-prompt"
    assert explorer.lens.options == ("logit",) and [v for _, v in explorer.sample.options] == [0]
    assert explorer.top_k.data[0].text[0][0].startswith("'#")  # no decoder given for this model
    paths = explorer.export(tmp_path / "lens", formats=("svg",))
    assert paths[0].read_text().lstrip().startswith("<svg")
    with pytest.raises(ValueError, match="lens statistics"):
        LensExplorer({})


def test_lens_explorer_from_models_computes_lazily(tiny, run):
    explorer = LensExplorer.from_models({"tiny": run}, {"tiny": tiny})
    explorer.wait(60)
    assert explorer.lens.options == ("logit",)
    expected = lens_statistics(run, tiny)
    n = min(16, int(run.valid[0].sum()))
    shown = expected.top_k_probs.isel(sample=0, layer=explorer.layer.value, pos=slice(0, n))
    np.testing.assert_allclose(np.array(explorer.top_k.data[0].z, dtype=float), shown.T.values)
