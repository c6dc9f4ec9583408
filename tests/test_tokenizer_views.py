"""The tokenizer explorer and the tokenizer figures: what they show is the analyses' numbers."""

import numpy as np
import pytest

import workbench as wb
from workbench.analyses.tokenizer_fairness import fairness_table, parallel_counts
from workbench.corpus import parallel_corpus
from workbench.plots import tokenizers as plots
from workbench.widgets import TokenizerExplorer
from workbench.widgets.tokenizer_explorer import CUSTOM, token_spans


@pytest.fixture(scope="module")
def toks():
    return {name: wb.load_tokenizer(name) for name in ("smollm2-135m", "gemma3-270m")}


def test_token_spans_cover_the_text_byte_for_byte(toks):
    text = "naïve café — 日本語 🙂 ñ"
    for tok in toks.values():
        spans = token_spans(tok, text)
        assert b"".join(s["bytes"] for s in spans) == text.encode("utf-8")
        assert [s["id"] for s in spans] == tok.encode(text, add_special_tokens=False)
        assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:]))


def test_explorer_controls_change_what_is_shown(toks, tmp_path):
    ex = TokenizerExplorer(toks, language="eng")
    ex.wait(60)
    first = ex.counts.value
    assert "English</b> needs <b>1.00x" in first
    ex.language.value = "mya"
    assert ex.text.value == parallel_corpus(["mya"])["mya"]["articles"][0]
    table = fairness_table(parallel_counts({"smollm2-135m": toks["smollm2-135m"]},
                                           {c: r["articles"] for c, r in parallel_corpus().items()}))
    expected = float(table.premium.sel(tokenizer="smollm2-135m", language="mya"))
    assert f"{expected:.2f}x" in ex.counts.value
    bar = ex.bars.data[0]
    highlighted = [x for x, c in zip(bar.x, bar.marker.color) if c != bar.marker.color[0]]
    assert highlighted == ["mya"]
    before = list(bar.y)
    ex.tokenizer.value = "gemma3-270m"
    ex.wait(60)
    assert list(ex.bars.data[0].y) != before and "gemma3-270m" in ex.bars.layout.title.text
    ex.language.value = CUSTOM
    ex.text.value = "Hello world"
    assert ex.counts.value.startswith("<b>2</b> tokens") and "English UDHR" in ex.counts.value
    assert ex.tokens.value.count("<span") == 2
    written = ex.export(tmp_path / "premium", formats=("svg", "png"))
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    with pytest.raises(ValueError, match="no parallel text"):
        TokenizerExplorer(toks, language="xx")


def test_figures_show_the_table(toks):
    texts = {c: r["articles"] for c, r in parallel_corpus(["eng", "fra", "tha"]).items()}
    table = fairness_table(parallel_counts(toks, texts))
    heat = plots.premium_heatmap(table)
    order = table.premium.isel(tokenizer=0).to_series().sort_values().index
    np.testing.assert_allclose(heat.data[0].z, np.log2(table.premium.transpose("language", "tokenizer").sel(language=order).values))
    bars = plots.premium_bars(table)
    assert [t.name for t in bars.data] == list(toks) and list(bars.data[0].y) == list(order)
