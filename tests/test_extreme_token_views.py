"""Extreme-token figures and the explorer, driven headless."""

import threading
import time

import numpy as np
import pytest

import workbench as wb
from workbench.analyses import extreme_tokens as et
from workbench.plots import (
    condition_bars,
    head_state_map,
    massive_activation_map,
    massive_activation_profile,
    scaling_curves,
    sink_score_by_domain,
    sink_score_heatmap,
    value_norm_vs_attention,
)
from workbench.widgets import ExtremeTokenExplorer
from workbench.widgets.base import SELECTED

from .conftest import PROSE


@pytest.fixture(scope="module")
def run(tiny):
    run = wb.capture(tiny, PROSE, ["resid_pre", "attn_pattern", "attn_received", "value_norm"], progress=False)
    return run.assign_coords(domain=("sample", ["prose", "prose", "chat", "chat"]))


def test_figures_carry_the_analysis_values(run):
    sink = et.sink_scores(run)
    fig = sink_score_heatmap(sink.mean("sample"))
    np.testing.assert_allclose(fig.data[0].z, sink.mean("sample").transpose("layer", "head").values)
    by_domain = sink.groupby("domain").mean()
    fig = sink_score_by_domain(by_domain)
    assert [a.text for a in fig.layout.annotations] == ["chat", "prose"]
    one = run.isel(sample=0).sel(layer=1)
    fig = value_norm_vs_attention(one.attn_received, one.value_norm, one.token)
    n = int(run.n_tokens[0])
    assert len(fig.data[1].x) == run.sizes["head"]  # one first-token point per head
    assert len(fig.data[0].x) == run.sizes["head"] * (n - 1)
    norms = np.concatenate([fig.data[0].y, fig.data[1].y])
    ticks = list(fig.layout.yaxis.tickvals)  # 1-2-5 steps spanning every norm, each written out
    assert ticks[0] <= norms.min() and ticks[-1] >= norms.max() and list(fig.layout.yaxis.ticktext) == [f"{t:g}" for t in ticks]
    assert {round(t / 10 ** np.floor(np.log10(t)), 6) for t in ticks} <= {1.0, 2.0, 5.0}
    assert [a.text for a in fig.layout.annotations] == ["other tokens", "first token"]  # named beside their points
    max_abs = et.max_abs_activation(run)
    np.testing.assert_allclose(massive_activation_map(max_abs).data[0].z, np.log10(max_abs.values))
    assert len(massive_activation_profile(max_abs, [0, 3]).data) == 3


def test_intervention_figures(tiny):
    texts = {"a": PROSE[:2], "b": PROSE[2:]}
    effects = et.head_ablation_effects(tiny, texts, progress=False)
    labels = et.classify_heads(et.sink_scores(wb.capture(tiny, PROSE, ["attn_received"], progress=False)
                                              .assign_coords(domain=("sample", ["a", "a", "b", "b"])))
                               .groupby("domain").mean(), effects)
    fig = head_state_map(effects, labels)
    np.testing.assert_allclose(fig.data[0].z, effects.delta_loss.sel(mode="zero", domain="a").values)
    sweep = et.first_token_attention_scaling(tiny, PROSE[:2], scales=(0.5, 1.0, 2.0))
    fig = scaling_curves(sweep)
    assert len(fig.data) == 2 * sweep.sizes["group"]
    colours = [(t.legendgroup, t.line.color) for t in fig.data]
    assert len(set(colours)) == sweep.sizes["group"] == len({c for _, c in colours})  # one colour per group, both panels
    streaming = et.streaming_perplexity(tiny, " ".join(PROSE), window=8, n_sink=2)
    fig = condition_bars(streaming, "perplexity", "StreamingLLM", "perplexity")
    np.testing.assert_allclose(fig.data[0].y, streaming.perplexity.values)
    assert fig.data[0].cliponaxis is False and fig.layout.yaxis.range[1] > streaming.perplexity.values.max()  # labels fit
    assert list(fig.data[0].text) == [f"{v:.3g}" for v in streaming.perplexity.values]  # one precision for every bar


def test_explorer_head_click_domain_and_sink_toggle(run, tmp_path):
    explorer = ExtremeTokenExplorer(run)
    explorer.layer.value = 1
    explorer.prompt.value = 1
    explorer.select_head(3)
    n = int(run.n_tokens[1])
    np.testing.assert_allclose(explorer.pattern.data[0].z, run.attn_pattern.isel(sample=1).sel(layer=1, head=3).values[:n, :n])
    assert explorer.pattern.layout.title.text == "layer 1 head 3, prompt 1"
    explorer.domain.value = "chat"
    assert [v for _, v in explorer.prompt.options] == [2, 3]
    expected_grid = et.sink_scores(run).isel(sample=[2, 3]).sel(layer=1).mean("sample").values
    np.testing.assert_allclose(explorer.grid.data[0].z[0], expected_grid)
    full = len(explorer.bars.data[0].x)
    explorer.exclude_sink.value = True
    assert len(explorer.bars.data[0].x) == full - 1 and explorer.bars.data[0].x[0] == 1
    explorer._grid_clicked(None, type("Points", (), {"xs": [2]})(), None)  # what a click on head 2 sends
    assert explorer.head.value == 2
    paths = explorer.export(tmp_path / "pattern", formats=("svg",))
    assert paths[0].read_text().lstrip().startswith("<svg")


def test_explorer_loads_patterns_in_the_background_once_per_prompt(tiny):
    run = wb.capture(tiny, PROSE[:3], ["attn_received"], progress=False)
    calls = []
    started, release = threading.Event(), threading.Event()

    def source(sample):
        calls.append(sample)
        started.set()
        release.wait(10)  # a capture that takes a while
        one = wb.capture(tiny, str(run.text.values[sample]), ["attn_pattern"], progress=False)
        return one.attn_pattern.isel(sample=0).values

    explorer = ExtremeTokenExplorer(run, pattern_source=source)
    assert started.wait(30)
    shown = time.monotonic() + 30
    while "prompt 0" not in explorer.busy.value and time.monotonic() < shown:
        time.sleep(0.01)
    assert "capturing the attention patterns of prompt 0" in explorer.busy.value  # past 0.2 s: says what it waits for
    explorer.prompt.value = 1  # moved on while prompt 0 is still being captured
    explorer.prompt.value = 2
    release.set()
    explorer.wait(60)
    assert calls == [0, 2]  # prompt 1 was passed over, never captured
    assert explorer.busy.value == ""
    expected = wb.capture(tiny, str(run.text.values[2]), ["attn_pattern"], progress=False)
    n = int(run.n_tokens[2])
    np.testing.assert_allclose(explorer.pattern.data[0].z, expected.attn_pattern.isel(sample=0).sel(layer=explorer.layer.value, head=0).values[:n, :n])
    explorer.head.value = 1
    explorer.layer.value = 0  # at hand: drawn at once, in this thread
    assert explorer.pattern.layout.title.text == "layer 0 head 1, prompt 2"
    assert calls == [0, 2]
    explorer.select_key(1)  # linked: the key is outlined in the pattern and its bar is coloured
    assert explorer.pattern.layout.shapes[0].x0 == 0.5
    assert explorer.bars.data[0].marker.color[1] == SELECTED
    with pytest.raises(ValueError, match="attn_pattern"):
        ExtremeTokenExplorer(run)


def test_explorer_shows_a_failed_capture_and_raises_it_on_wait(tiny):
    run = wb.capture(tiny, PROSE[:2], ["attn_received"], progress=False)
    explorer = ExtremeTokenExplorer(run, pattern_source=lambda sample: np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="expected"):
        explorer.wait(30)
    assert "failed" in explorer.busy.value and "expected" in explorer.busy.value
