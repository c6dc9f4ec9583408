"""Tokenization bias along text, byte-level ensembles, their figures and the ByteLens widget.

Hand-built worlds with known answers: a character-level vocabulary (one tokenization per
string, so naive == token healing == exact and every cut is a token boundary), and a vocabulary
with merges (several tokenizations, so the naive answer is biased inside tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import workbench as wb

from workbench.analyses.byte_bias import (
    bias_along_text,
    compare_next_byte,
    cover_encodings,
    ensemble_bits_per_byte,
    mixture_logprob,
    prompt_cut_invariance,
    weight_grid,
)
from workbench.analyses.byte_baselines import (
    naive_next_byte_distribution,
    token_healing_next_byte_distribution,
)
from workbench.analyses.byte_ensemble import ByteLevelEnsemble
from workbench.analyses.byte_level import ByteLevelModel
from workbench.threads import single_thread
from workbench.models import ModelHandle
from workbench.plots import (
    bias_along_text_figure,
    bits_per_byte_figure,
    covers_table,
    next_byte_bars,
    prompt_cut_figure,
)
from workbench.widgets import ByteLens

EXACT = dict(prune=0, max_hypotheses=None)  # every cover summed: exact to float precision


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: more torch threads only add synchronisation, badly so on a shared machine."""
    with single_thread():
        yield


def _handle(vocab: dict, merges: list, name: str, seed: int) -> ModelHandle:
    """A random 2-layer float64 Llama over a hand-built BPE vocabulary (token strings are their UTF-8)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.6, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"  # the whole softmax in float64 (eager's is float32 for every dtype)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).double().eval()
    return ModelHandle(name, model, tokenizer, "random init", f"seed-{seed}")


def test_token_healing_when_the_last_token_is_the_longest_in_the_vocabulary():
    from workbench.analyses.byte_baselines import token_healing_next_byte_distribution

    handle = _handle({"<eos>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], "longest-llama", 5)
    healed = token_healing_next_byte_distribution(handle, "ab")  # "ab" is the longest token: nothing extends it
    assert healed.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert healed.sel(byte=[ord("a"), ord("b")]).sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.fixture(scope="module")
def chars():
    """One token per character of the texts (a, b, space): every string has a single tokenization."""
    return _handle({"<eos>": 0, "a": 1, "b": 2, " ": 3, "c": 4, "cc": 5}, [], "char-llama", 1)


@pytest.fixture(scope="module")
def merged():
    """Merges "ab", "ba", " a": strings have several tokenizations and the canonical one ends inside words."""
    vocab = {"<eos>": 0, "a": 1, "b": 2, " ": 3, "ab": 4, "ba": 5, " a": 6, "c": 7, "ccc": 8}
    return _handle(vocab, [("a", "b"), ("b", "a"), (" ", "a")], "merge-llama", 3)


# --------------------------------------------------------------------------- analyses on known answers


def test_tv_is_zero_where_naive_equals_exact(chars):
    ds = bias_along_text(chars, "ab ba b a", **EXACT)
    assert ds.sizes == {"estimate": 3, "byte_pos": 9, "byte": 256, "baseline": 2}
    np.testing.assert_allclose(ds.probability.sum("byte"), 1.0, atol=1e-12)
    np.testing.assert_allclose(ds.total_variation, 0.0, atol=1e-9)
    np.testing.assert_allclose(ds.kl_divergence, 0.0, atol=1e-9)
    assert ds.token_boundary.all()  # one character per token: every cut is a boundary
    assert ds.after_space.values.tolist() == [i > 0 and "ab ba b a"[i - 1] == " " for i in range(9)]


def test_boundary_flags_match_the_canonical_encoding_and_the_bias_bites_inside_tokens(merged):
    text = "abba ab bab a"
    ds = bias_along_text(merged, text, **EXACT)
    enc = merged.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]  # ASCII: character offsets are byte offsets
    assert len(spans) < len(text)  # merges happened
    starts = {s for s, _ in spans}
    assert ds.token_boundary.values.tolist() == [i in starts for i in range(len(text))]
    assert ds.token_index.values.tolist() == [next(k for k, (s, e) in enumerate(spans) if s <= i < e)
                                              for i in range(len(text))]
    assert ds.attrs["n_tokens"] == len(spans)
    naive_tv = ds.total_variation.sel(baseline="naive")
    assert float(naive_tv[0]) == pytest.approx(0.0, abs=1e-12)  # empty prefix: every method agrees
    assert float(naive_tv.where(~ds.token_boundary).max()) > 0.05
    # each estimate against an independent call, and TV by its definition
    for i in (3, 6, 9):
        prefix = text[:i]
        naive = naive_next_byte_distribution(merged, prefix).values
        healed = token_healing_next_byte_distribution(merged, prefix).values
        exact = ByteLevelModel(merged, **EXACT).next_byte_distribution(prefix).values
        np.testing.assert_allclose(ds.probability.sel(estimate="naive", byte_pos=i), naive, atol=1e-12)
        np.testing.assert_allclose(ds.probability.sel(estimate="token_healing", byte_pos=i), healed, atol=1e-12)
        np.testing.assert_allclose(ds.probability.sel(estimate="exact", byte_pos=i), exact, atol=1e-10)
        assert float(naive_tv[i]) == pytest.approx(0.5 * np.abs(naive - exact).sum(), abs=1e-10)
        kl = sum(p * math.log(p / q) for p, q in zip(exact, healed) if p > 0)
        assert float(ds.kl_divergence.sel(baseline="token_healing", byte_pos=i)) == pytest.approx(kl, abs=1e-9)
    one = compare_next_byte(merged, text[:6], **EXACT)
    np.testing.assert_allclose(one.probability, ds.probability.sel(byte_pos=6), atol=1e-10)
    np.testing.assert_allclose(one.total_variation, ds.total_variation.sel(byte_pos=6), atol=1e-10)


def test_covers_carry_all_of_p_x(merged):
    model = ByteLevelModel(merged, **EXACT)
    every = cover_encodings(model, "abb", top=None)
    assert every.sizes["cover"] == every.attrs["n_covers"] > 1
    assert float(every.share.sum()) == pytest.approx(1.0, abs=1e-9)
    assert (np.diff(every.logprob.values) <= 0).all()
    assert all("".join(t.split("|")).startswith("abb") for t in every.tokens.values)
    top = cover_encodings(model, "abb", top=2)
    assert top.sizes["cover"] == 2 and top.attrs["share_shown"] == pytest.approx(float(every.share[:2].sum()))


def test_exact_reading_does_not_depend_on_the_prompt_cut_naive_does(merged):
    text = "ab bab ba"
    inv = prompt_cut_invariance(merged, text, **EXACT)
    total = ByteLevelModel(merged, **EXACT).prefix_logprob(text)
    np.testing.assert_allclose(inv.exact_logprob, total, atol=1e-9)
    assert float(inv.naive_logprob.max() - inv.naive_logprob.min()) > 0.1
    at_boundary = inv.naive_logprob.where(inv.token_boundary, drop=True)
    np.testing.assert_allclose(at_boundary, inv.attrs["canonical"], atol=1e-9)  # same tokens as the canonical encoding
    with pytest.raises(ValueError, match="character boundaries"):
        prompt_cut_invariance(merged, text, cuts=[0])


def test_ensemble_bits_per_byte_against_the_ensemble_class(chars, merged):
    texts, validation = ["ab ba", "bab a b"], "abba ba"
    ens = ensemble_bits_per_byte({"chars": chars, "merged": merged}, texts, validation, weight_step=0.25, **EXACT)
    assert ens.model.values.tolist() == ["chars", "merged", "ensemble", "ensemble_tuned"]
    n = sum(len(t) for t in texts)
    streams = [ByteLevelEnsemble([ByteLevelModel(chars, **EXACT), ByteLevelModel(merged, **EXACT)]).stream(t)
               for t in texts]
    member = np.concatenate([s.member_logprob.values for s in streams], axis=1)
    for j, name in enumerate(["chars", "merged"]):
        assert float(ens.bits_per_byte.sel(model=name)) == pytest.approx(-member[j].sum() / (n * math.log(2)))
    equal = np.concatenate([s.logprob.values for s in streams])
    np.testing.assert_allclose(mixture_logprob(member, [1, 1]), equal, atol=1e-12)
    assert float(ens.bits_per_byte.sel(model="ensemble")) == pytest.approx(-equal.sum() / (n * math.log(2)))
    # a mixture never codes worse than the average of its members (log is concave)
    members = float(ens.bits_per_byte.sel(model=["chars", "merged"]).mean())
    assert float(ens.bits_per_byte.sel(model="ensemble")) <= members
    best = int(np.argmin(ens.validation_bits_per_byte.values))
    np.testing.assert_allclose(ens.weight.sel(model="ensemble_tuned"), ens.grid_weight[best])
    tuned = mixture_logprob(member, ens.grid_weight[best].values)
    assert float(ens.bits_per_byte.sel(model="ensemble_tuned")) == pytest.approx(-tuned.sum() / (n * math.log(2)))
    assert float(ens.calls_per_byte.sel(model="ensemble")) == pytest.approx(
        float(ens.calls_per_byte.sel(model=["chars", "merged"]).sum()))
    assert np.isnan(ens.token_level_bits_per_byte.sel(model="ensemble"))
    np.testing.assert_allclose(weight_grid(2, 0.5), [[0, 1], [0.5, 0.5], [1, 0]])


# --------------------------------------------------------------------------- figures


def _shown(tokens: str) -> str:
    """How the covers table writes one cover: tokens separated by " | ", spaces as ␣."""
    return " | ".join(part.replace(" ", "\u2423") for part in tokens.split("|"))


@pytest.fixture(scope="module")
def along(tiny):
    return bias_along_text(tiny, "The cat sat. Le café")


def test_figures_carry_the_analysis_values(along, merged, chars):
    cut = 6
    fig = next_byte_bars(along.sel(byte_pos=cut), top=5)
    assert [t.name for t in fig.data] == ["exact", "naive", "token healing"]
    shown = list(fig.data[0].customdata)
    assert len(shown) == 5 and list(fig.data[0].y) == sorted(fig.data[0].y, reverse=True)
    for trace, estimate in zip(fig.data, ("exact", "naive", "token_healing")):
        np.testing.assert_allclose(trace.y, along.probability.sel(estimate=estimate, byte_pos=cut).values[shown])
    assert "The\u2423ca" in fig.layout.title.text  # the prefix, its space visible
    fig = bias_along_text_figure(along)
    lines = [t for t in fig.data if t.x[0] is not None]
    assert [t.name for t in lines] == ["naive", "token healing"]
    np.testing.assert_allclose(lines[0].y, along.total_variation.sel(baseline="naive").values)
    assert list(fig.layout.xaxis.ticktext[:4]) == ["T", "h", "e", "\u2423"]
    assert fig.layout.xaxis.ticktext[-1] == "·"  # the second byte of é
    assert len(fig.layout.shapes) == len(set(along.token_index.values[along.token_index.values % 2 == 1]))
    assert len(bias_along_text_figure({"a": along, "b": along}, stop=8).data) == 2 * 2 + 2
    covers = cover_encodings(ByteLevelModel(merged, **EXACT), "ab", top=2)
    table = covers_table(covers)
    columns = table.data[0].cells.values
    assert len(columns[1]) == 3 and columns[1][-1].startswith(f"… {covers.attrs['n_covers'] - 2} more")
    assert list(columns[1][:2]) == [_shown(t) for t in covers.tokens.values]
    ens = ensemble_bits_per_byte({"chars": chars, "merged": merged}, ["ab ba"], **EXACT)
    fig = bits_per_byte_figure(ens)
    members, ensembles = fig.data[0], fig.data[1]  # one bar trace per colour, both in the legend
    np.testing.assert_allclose(list(members.y) + list(ensembles.y), ens.bits_per_byte.values)
    assert len(members.y) == 2 and members.name.endswith("one model") and ensembles.name.endswith("ensemble")
    assert len(fig.data[2].y) == 2  # token-level diamonds for the members only
    inv = prompt_cut_invariance(merged, "ab ba", **EXACT)
    fig = prompt_cut_figure(inv)
    np.testing.assert_allclose(fig.data[1].y, inv.exact_logprob.values)


# --------------------------------------------------------------------------- the widget


def test_byte_lens_slider_models_covers_and_export(tiny, chars, tmp_path):
    lens = ByteLens({"tiny": tiny, "chars": chars}, text="ab ba ab", cut=4, top=6, n_covers=5)
    lens.wait(60)
    assert list(lens._byte_models) == ["tiny"]  # built lazily: only the model shown
    expected = compare_next_byte(ByteLevelModel(tiny), "ab b")
    bars = {t.name: t for t in lens.bars.data}
    shown = list(bars["naive"].customdata)
    np.testing.assert_allclose(bars["naive"].y, expected.probability.sel(estimate="naive").values[shown])
    before = list(bars["exact"].y)
    lens.cut.value = 3  # after the space
    assert lens.prefix == b"ab "
    lens.wait(60)
    after = {t.name: t for t in lens.bars.data}
    assert list(after["exact"].y) != before
    expected = compare_next_byte(ByteLevelModel(tiny), "ab ")
    shown = list(after["exact"].customdata)
    np.testing.assert_allclose(after["exact"].y, expected.probability.sel(estimate="exact").values[shown], atol=1e-6)
    covers = cover_encodings(ByteLevelModel(tiny), "ab ", top=5)
    listed = lens.covers.data[0].cells.values[1]
    assert list(listed[:5]) == [_shown(t) for t in covers.tokens.values]
    assert listed[5].startswith(f"… {covers.attrs['n_covers'] - 5} more")
    assert "TV(naive, exact)" in lens.distances.value and "<b" in lens.where.value
    first = lens.results_for("tiny", b"ab ")
    assert lens.results_for("tiny", b"ab ") is first  # cached per (model, prefix)
    lens.model.value = "chars"
    lens.wait(60)
    assert set(lens._byte_models) == {"tiny", "chars"}
    np.testing.assert_allclose(lens.current[0].total_variation, 0.0, atol=1e-9)  # naive is exact for characters
    lens.text.value = "ba"
    assert lens.cut.max == 2 and lens.cut.value == 2
    lens.wait(60)
    lens.model.value = "tiny"
    lens.text.value = "café"
    lens.cut.value = 4
    lens.wait(60)
    assert "inside a multi-byte UTF-8 character" in lens.where.value
    paths = lens.export(tmp_path / "lens", formats=("svg",))
    assert [p.name for p in paths] == ["lens.svg", "lens_covers.svg"]
    assert all(p.read_text().lstrip().startswith("<svg") for p in paths)


def test_background_work_and_a_notebook_cell_share_one_model_safely(smollm2):
    """The byte lens computes in a background thread while the notebook's next cell asks the same byte-level
    model (and captures with the same model): each call holds the model's lock, so both get the numbers they
    would get alone (before the lock, the tree attention of one thread ran inside the other's forward), up to
    the float32 rounding of rows batched differently (a walk from a kept state, or scoring ahead: 1e-5)."""
    text = "The function returns a value."
    alone = ByteLevelModel(smollm2)
    expected = {cut: alone.next_byte_distribution(text[:cut]).values for cut in (4, 9, 17, 24)}
    expected_run = wb.capture(smollm2, text, ["resid_post"], progress=False).resid_post.values
    lens = ByteLens(smollm2, text=text, cut=24)  # computing in the background now
    shared = lens.byte_model(smollm2.name)
    for cut in (4, 9, 17):
        np.testing.assert_allclose(shared.next_byte_distribution(text[:cut]).values, expected[cut], atol=1e-5)
        lens.cut.value = cut + 1  # more background work meanwhile
    np.testing.assert_allclose(wb.capture(smollm2, text, ["resid_post"], progress=False).resid_post.values,
                               expected_run, rtol=1e-5, atol=1e-5)
    lens.cut.value = 24
    lens.wait(300)
    np.testing.assert_allclose(lens.current[0].probability.sel(estimate="exact").values, expected[24], atol=1e-5)
