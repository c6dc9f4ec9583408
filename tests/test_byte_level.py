"""Exact byte-level probabilities (Phan et al., 2024): token bytes, the KV-reusing scorer, the
Byte-Token Representation Lemma against brute-force enumeration, and the baselines it fixes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.analyses.byte_baselines import (
    kl_divergence,
    naive_next_byte_distribution,
    token_healing_next_byte_distribution,
    total_variation,
)
from workbench.analyses.byte_ensemble import ByteLevelEnsemble, bits_per_byte
from workbench.analyses import byte_level
from workbench.analyses.byte_level import ByteLevelModel, ImpossiblePrefixError, start_context
from workbench.models import ModelHandle
from workbench.probes import token_scoring
from workbench.probes.token_scoring import (
    PrefixTreeScorer,
    StaleSequenceError,
    last_token_logprobs,
    sequence_logprobs,
)
from workbench.tokenization.vocab_bytes import UnsupportedTokenizerError, gpt2_bytes_to_unicode, vocab_bytes

# --------------------------------------------------------------------------- a tiny world we can enumerate


def _ab_tokenizer(normalizer=None, model=None, pre_tokenizer=None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4, "bb": 5}
    tok = Tokenizer(model or models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "a"), ("b", "b")]))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def ab():
    """A random 2-layer Llama over the vocabulary {<eos>, a, b, ab, ba, bb}, peaked enough to be uneven."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.6, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"  # the whole softmax in float64 (eager's is float32 for every dtype)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LlamaForCausalLM(config).double().eval()  # float64: the lemma is checked to 1e-9
    return ModelHandle("ab-llama", model, _ab_tokenizer(), "random init", "seed-3")


def _brute_force_logp(handle: ModelHandle, x: bytes) -> float:
    """log P(text starts with x) by enumerating every sequence of len(x) byte tokens (no covers involved).

    Each token spells >= 1 byte, so the sequences of exactly K = len(x) tokens partition all
    token streams and each spells >= len(x) bytes: P(x) = sum of P(seq) over those spelling x first.
    Special tokens are conditioned away at every step, as in ByteLevelModel.
    """
    if not x:
        return 0.0
    vocab = vocab_bytes(handle.tokenizer)
    byte_tokens = [t for t in range(vocab.size) if vocab.token_bytes[t] is not None]
    seqs = [s for s in itertools.product(byte_tokens, repeat=len(x)) if vocab.decode(s).startswith(x)]
    if not seqs:
        return -math.inf
    context = start_context(handle)
    ids = torch.tensor([context + list(s) for s in seqs])
    with torch.no_grad():
        logits = handle.hf_model(input_ids=ids, use_cache=False).logits.double()
    logp = torch.log_softmax(logits, -1)
    logq = logp - torch.logsumexp(logp[..., byte_tokens], -1, keepdim=True)
    steps = logq[:, len(context) - 1 : -1].gather(-1, ids[:, len(context) :, None])[..., 0]
    return float(torch.logsumexp(steps.sum(-1), 0))


def _brute_force_covers(handle: ModelHandle, x: bytes) -> dict:
    """Every cover encoding of x by its definition, enumerated over all sequences of <= len(x) tokens."""
    vocab = vocab_bytes(handle.tokenizer)
    byte_tokens = [t for t in range(vocab.size) if vocab.token_bytes[t] is not None]
    covers = {}
    for k in range(1, len(x) + 1):
        for seq in itertools.product(byte_tokens, repeat=k):
            head, full = vocab.decode(seq[:-1]), vocab.decode(seq)
            if len(head) < len(x) and x.startswith(head) and full.startswith(x):
                ids = torch.tensor([start_context(handle) + list(seq)])
                with torch.no_grad():
                    logp = torch.log_softmax(handle.hf_model(input_ids=ids, use_cache=False).logits.double(), -1)
                logq = logp - torch.logsumexp(logp[..., byte_tokens], -1, keepdim=True)
                covers[seq] = float(logq[0, :-1].gather(-1, ids[0, 1:, None]).sum())
    return covers


AB_STRINGS = [b"a", b"b", b"ab", b"ba", b"bb", b"aab", b"abba", b"babb"]


def test_lemma_equals_brute_force_enumeration(ab):
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    assert model.context_ids == [0]  # no BOS added: the EOS token starts the text
    assert model.prefix_logprob(b"") == 0.0
    for x in AB_STRINGS:
        assert model.prefix_logprob(x) == pytest.approx(_brute_force_logp(ab, x), abs=1e-9), x
        dist = model.next_byte_distribution(x)
        for b in b"ab":
            expected = math.exp(_brute_force_logp(ab, x + bytes([b])) - _brute_force_logp(ab, x))
            assert float(dist.sel(byte=b)) == pytest.approx(expected, abs=1e-9), (x, chr(b))
        assert dist.attrs["impossible_bytes"] == [b for b in range(256) if b not in b"ab"]
        assert float(dist.drop_sel(byte=list(b"ab")).sum()) == 0.0


def test_covers_are_exactly_the_definition(ab):
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    for x in [b"a", b"ab", b"bab", b"abba"]:
        got = {ids: lp for ids, _, lp in model.covers(x)}
        expected = _brute_force_covers(ab, x)
        assert set(got) == set(expected), x
        for seq, lp in expected.items():
            assert got[seq] == pytest.approx(lp, abs=1e-9)
        assert float(np.logaddexp.reduce(list(got.values()))) == pytest.approx(model.prefix_logprob(x), abs=1e-12)
    ids, strings, _ = model.covers(b"abba")[0]
    assert "".join(strings).startswith("abba") and len(strings) == len(ids)


def test_chain_rule_is_exact_without_pruning(ab):
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    ds = model.stream(b"abbabab")
    assert float(ds.pruned_fraction.sum()) == 0.0
    assert float(ds.logprob.sum()) == pytest.approx(float(ds.prefix_logprob[-1]), rel=1e-12)
    assert float(ds.prefix_logprob[-1]) == pytest.approx(_brute_force_logp(ab, b"abbabab"), abs=1e-9)


# --------------------------------------------------------------------------- vocabulary bytes


def test_gpt2_byte_table_is_a_bijection():
    table = gpt2_bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_byte_level_vocabulary(tiny):
    vocab = vocab_bytes(tiny.tokenizer)  # SmolLM2's tokenizer
    assert vocab.scheme == "byte_level" and vocab is vocab_bytes(tiny.tokenizer)
    tok = tiny.tokenizer
    assert vocab.token_bytes[tok.convert_tokens_to_ids("<|endoftext|>")] is None
    assert vocab.token_bytes[tok.convert_tokens_to_ids("Ġthe")] == b" the"
    assert vocab.token_bytes[tok.convert_tokens_to_ids("Ċ")] == b"\n"
    for text in ["The cat sat.", "Élan — naïve café 🙂", "  x\t\n\ny"]:
        assert vocab.decode(tok(text, add_special_tokens=False)["input_ids"]) == text.encode()
    every = [(t, b) for t, b in enumerate(vocab.token_bytes) if b is not None]
    for s in [b" th", b"\xe2\x80", b"zq", b"", b"\xff"]:
        assert sorted(vocab.tokens_starting_with(s).tolist()) == [t for t, b in every if b.startswith(s)], s
    s = b" therefore"
    assert sorted(vocab.tokens_prefix_of(s)) == sorted((t, len(b)) for t, b in every if s.startswith(b))
    # bytes that never occur in UTF-8 are not in SmolLM2's alphabet
    assert not vocab.producible_first_bytes()[0xC0] and vocab.producible_first_bytes()[ord("a")]


def test_sentencepiece_vocabulary_with_byte_fallback(gemma3):
    vocab = vocab_bytes(gemma3.tokenizer)
    tok = gemma3.tokenizer
    assert vocab.scheme == "sentencepiece"
    assert vocab.token_bytes[tok.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert vocab.token_bytes[tok.convert_tokens_to_ids("\u2581the")] == b" the"
    assert vocab.token_bytes[tok.bos_token_id] is None
    assert start_context(gemma3) == [tok.bos_token_id]
    for text in ["The cat sat.", "swimsuit 🩱 here", " two  spaces\n"]:
        assert vocab.decode(tok(text, add_special_tokens=False)["input_ids"]) == text.encode()


def test_unsupported_tokenizers_say_why():
    from tokenizers import models, normalizers, pre_tokenizers

    with pytest.raises(UnsupportedTokenizerError, match="Lowercase"):
        vocab_bytes(_ab_tokenizer(normalizer=normalizers.Lowercase()))
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece"):
        vocab_bytes(_ab_tokenizer(model=models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]")))
    with pytest.raises(UnsupportedTokenizerError, match="prepends a space marker"):
        vocab_bytes(_ab_tokenizer(pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="always")))

    class SlowTokenizer:
        def __len__(self):
            return 3

    with pytest.raises(UnsupportedTokenizerError, match="not backed by the `tokenizers` library"):
        vocab_bytes(SlowTokenizer())


# --------------------------------------------------------------------------- the scorer


@pytest.mark.parametrize("shared", [True, False], ids=["shared-trunk attention", "padded cache"])
def test_prefix_tree_scorer_matches_plain_forwards(tiny, shared):
    scorer = PrefixTreeScorer(tiny, shared_trunk_attention=shared)
    root = scorer.start([0, 17])
    np.testing.assert_allclose(root.logprobs, last_token_logprobs(tiny, [0, 17]), atol=1e-5)
    a, b = scorer.extend([(root, 300), (root, 301)])
    scorer.commit([a, b])
    aa, ab_, ba = scorer.extend([(a, 5), (a, 6), (b, 7)])  # rows with different private lengths
    scorer.commit([aa, ba])  # their common prefix is still (0, 17): ab_ stays usable
    assert scorer.trunk_length == 2 and scorer.usable(ab_)
    deeper = scorer.extend([(aa, 8), (ba, 9), (ab_, 10)])
    scorer.commit([deeper[0]])  # the trunk grows over aa + 8
    assert scorer.trunk_length == 5 and not scorer.usable(ba)
    deepest = scorer.extend([(deeper[0], 11)])
    for seq in [a, b, aa, ab_, ba, *deeper, *deepest]:
        np.testing.assert_allclose(seq.logprobs, last_token_logprobs(tiny, seq.ids), atol=1e-5)
    assert scorer.calls == 5 and scorer.positions == 2 + 2 + 3 + 3 + 1
    with pytest.raises(StaleSequenceError, match="no longer starts with the shared trunk"):
        scorer.extend([(ba, 1)])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-trunk attention", "padded cache"])
def test_prefix_tree_scorer_chains_of_new_tokens_in_one_call(tiny, shared):
    """A request may extend an earlier request of the same call: a tree of new tokens, each row seeing its
    ancestors among the rows (one pass with shared-trunk attention; one per depth with the padded cache)."""
    scorer = PrefixTreeScorer(tiny, shared_trunk_attention=shared)
    root = scorer.start([0, 17])
    (a,) = scorer.extend([(root, 300)])
    calls = scorer.calls
    # two chains off the trunk's sequence, one branching, and one row off an older sequence
    rows = scorer.extend([(a, 5), (0, 6), (1, 7), (1, 8), (root, 9), (4, 10), (a, 11)])
    assert scorer.calls - calls == (1 if shared else 3) and scorer.positions == 2 + 1 + 7
    assert [r.ids for r in rows] == [(0, 17, 300, 5), (0, 17, 300, 5, 6), (0, 17, 300, 5, 6, 7), (0, 17, 300, 5, 6, 8),
                                     (0, 17, 9), (0, 17, 9, 10), (0, 17, 300, 11)]
    scorer.commit([rows[2], rows[3], rows[5]])  # the trunk stays (0, 17): the pool keeps the chains' keys
    more = scorer.extend([(rows[3], 12), (0, 13), (rows[5], 14)])  # and on from them
    for seq in [*rows, *more]:
        np.testing.assert_allclose(seq.logprobs, last_token_logprobs(tiny, seq.ids), atol=1e-5)
    with pytest.raises(ValueError, match="must point at an earlier request"):
        scorer.extend([(root, 1), (1, 2)])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-trunk attention", "padded cache"])
def test_prefix_tree_scorer_frees_what_is_not_kept(tiny, shared, monkeypatch):
    monkeypatch.setattr(token_scoring, "_COMPACT_MIN_SLOTS", 0)
    scorer = PrefixTreeScorer(tiny, shared_trunk_attention=shared)
    root = scorer.start([0, 17])
    kids = scorer.extend([(root, t) for t in range(300, 310)])
    scorer.commit([kids[7], kids[3]])  # ten slots held, two live: the pool is compacted to those two
    assert scorer.trunk_length == 2 and scorer.usable(kids[3]) and scorer.usable(kids[7])
    assert not scorer.usable(kids[0]) and not scorer.usable(root)
    grand = scorer.extend([(kids[7], 5), (kids[3], 6), (kids[7], 8)])
    scorer.commit(grand)
    (deepest,) = scorer.extend([(grand[2], 9)])
    for seq in [*grand, deepest]:
        np.testing.assert_allclose(seq.logprobs, last_token_logprobs(tiny, seq.ids), atol=1e-5)
    with pytest.raises(StaleSequenceError, match="not kept by the last commit"):
        scorer.extend([(kids[0], 1)])


def test_prefix_tree_scorer_past_gemmas_sliding_window(gemma3):
    window = gemma3.config.sliding_window
    ids = [gemma3.tokenizer.bos_token_id] + list(range(1000, 1000 + window + 20))
    scorer = PrefixTreeScorer(gemma3)
    assert scorer.shared_trunk_attention
    root = scorer.start(ids)
    scorer.commit([root])
    a, b = scorer.extend([(root, 5000), (root, 5001)])
    scorer.commit([a, b])
    (c,) = scorer.extend([(a, 5002)])
    chain = scorer.extend([(c, 5003), (0, 5004), (1, 5005), (b, 5006)])  # new rows past the window too
    for seq in (b, c, *chain):  # Hugging Face's own forward over the whole sequence, window applied
        np.testing.assert_allclose(seq.logprobs, last_token_logprobs(gemma3, seq.ids), atol=2e-4)
    assert gemma3.attn_implementation == "eager"  # the custom attention was only switched on for the call


# --------------------------------------------------------------------------- distributions, chain rule, properties


def test_empty_prefix_is_the_first_byte_distribution_for_every_method(tiny):
    exact = ByteLevelModel(tiny).next_byte_distribution("")
    assert exact.dims == ("byte",) and list(exact.byte.values) == list(range(256))
    assert exact.char.sel(byte=ord("a")).item() == "a"
    for other in (naive_next_byte_distribution(tiny, ""), token_healing_next_byte_distribution(tiny, "")):
        assert total_variation(exact, other) < 1e-12
    # a special token's string inside the text is text to every method, never the control token
    literal = naive_next_byte_distribution(tiny, "x<|endoftext|>")
    assert literal.attrs["n_prompt_tokens"] > 2


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=["a", "b", " ", "é", "🙂", "日", "\n", "x"], min_size=1, max_size=4),
       cut=st.integers(min_value=0, max_value=15))
def test_properties_on_random_strings(tiny, text, cut):
    data = text.encode()
    model = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48)
    ds = model.stream(data)
    probs = ds.probability.values
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # chain rule: the stream's log-probabilities add up to log P(text) from covers, up to what was pruned
    implied = float(ds.prefix_logprob[-1]) - float(np.log1p(-ds.pruned_fraction.values).sum())
    assert float(ds.logprob.sum()) == pytest.approx(implied, rel=1e-9, abs=1e-9)
    # any cut, also inside a UTF-8 character, computed afresh, equals the streamed row: exactly when the stream
    # also makes one call per step (the same float arithmetic), to float32 rounding when it scores ahead
    cut = min(cut, len(data) - 1)
    fresh = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).next_byte_distribution(data[:cut])
    step = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).stream(data, lookahead=False)
    # a query of 8 bytes or more scores ahead along them too (rows batched differently: float32 rounding)
    exact = cut < byte_level._LOOKAHEAD_MIN_BYTES
    np.testing.assert_allclose(fresh.values, step.probability.values[cut], atol=1e-12 if exact else 1e-6)
    np.testing.assert_allclose(fresh.values, probs[cut], atol=1e-6)
    assert all(fresh.values[b] == 0 for b in fresh.attrs["impossible_bytes"])


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_scoring_ahead_gives_the_numbers_of_one_call_per_step(name, request):
    """stream() scores tokenizations before the walk reaches them (the text is known); which ones the walk
    follows is decided as before, so every cut's distribution is the one-call-per-step one, in fewer calls."""
    handle = request.getfixturevalue(name)
    text = 'The "assert" statement:\n    assert identifier, naïve'
    ahead = ByteLevelModel(handle).stream(text, lookahead=True)
    step = ByteLevelModel(handle).stream(text, lookahead=False)
    assert (ahead.n_tokenizations.values == step.n_tokenizations.values).all()
    np.testing.assert_allclose(ahead.probability, step.probability, atol=1e-5)
    np.testing.assert_allclose(ahead.prefix_logprob, step.prefix_logprob, rtol=1e-6)
    np.testing.assert_allclose(ahead.pruned_fraction, step.pruned_fraction, atol=1e-6)
    assert ahead.attrs["calls"] < step.attrs["calls"] / 2


def test_drafted_and_side_by_side_sampling_draw_the_bytes_of_one_call_per_byte(smollm2):
    """sample() scores ahead along a guess of its next bytes (drawn with its own uniforms), samples() walks several
    draws in one call per byte: only the cost changes, so the seeded draws are those of one call per byte."""
    prefix = "The history of the city begins"

    def calls_to_draw(draw):
        model = ByteLevelModel(smollm2)
        model.sample(prefix, n_bytes=0)
        before = model.calls
        return draw(model), model.calls - before

    step, step_calls = calls_to_draw(lambda m: m.sample(prefix, n_bytes=40, seed=3, draft=False))
    drafted, drafted_calls = calls_to_draw(lambda m: m.sample(prefix, n_bytes=40, seed=3))
    assert drafted == step and len(step) == 40
    assert drafted_calls < 0.6 * step_calls
    singles = [calls_to_draw(lambda m, s=s: m.sample(prefix, n_bytes=16, seed=s, draft=False)) for s in (5, 6, 7)]
    together, together_calls = calls_to_draw(lambda m: m.samples(prefix, n_samples=3, n_bytes=16, seed=5))
    assert together == [drawn for drawn, _ in singles]
    assert together_calls <= 16 < sum(calls for _, calls in singles)
    with pytest.raises(ValueError, match="n_samples"):
        ByteLevelModel(smollm2).samples(prefix, n_samples=0)


def test_sampling_scores_the_splits_inside_a_word_ahead(smollm2, monkeypatch):
    """A draw also scores, after the tokenizations it requests ahead, the short tokens that spell its draft (" w" + "i"
    of " with"): the same bytes in fewer calls than with no split scored ahead (_SPLIT_BYTES = 0)."""
    from workbench.analyses import byte_level

    prefix = "The history of the city begins"

    def draw():
        model = ByteLevelModel(smollm2)
        model.sample(prefix, n_bytes=0)
        before = model.calls
        return model.sample(prefix, n_bytes=48, seed=1), model.calls - before

    with_splits, calls = draw()
    monkeypatch.setattr(byte_level, "_SPLIT_BYTES", 0)
    without, calls_without = draw()
    assert with_splits == without and len(without) == 48
    assert calls < calls_without


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_drafts_and_side_by_side_walks_on_a_random_model(tiny, temperature):
    """On flat distributions (random weights) the guesses are often wrong and many tokenizations are followed:
    the draws must still be those of one call per byte, for any prefix, seed and temperature."""
    for seed, prefix in enumerate(["", "a", "The caf\u00e9 ", "x\n\n  y"]):
        step = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).sample(prefix, 10, seed, temperature, draft=False)
        drafted = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).sample(prefix, 10, seed, temperature)
        together = ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).samples(prefix, 2, 10, seed, temperature)
        assert drafted == step == together[0]
        assert together[1] == ByteLevelModel(tiny, prune=1e-6, max_hypotheses=48).sample(
            prefix, 10, seed + 1, temperature, draft=False)


def test_drawing_with_uniforms_drawn_ahead_is_numpys_choice():
    """draw_byte with the generator's uniforms drawn ahead picks what Generator.choice picks, byte for byte."""
    for seed in range(50):
        dists = np.random.default_rng(seed).dirichlet(np.full(256, 0.05), size=12)
        dists[:, 7] = 0.0  # a byte of probability 0 is never drawn
        choice = np.random.default_rng(seed + 100)
        expected = [int(choice.choice(256, p=p / p.sum())) for p in dists]
        uniforms = byte_level.sampling_uniforms(12, seed + 100, 1.0)
        assert [byte_level.draw_byte(p, u, 1.0) for p, u in zip(dists, uniforms)] == expected
        assert 7 not in expected
    cold = byte_level.draw_byte(np.r_[0.9, 0.1, np.zeros(254)], 0.85, temperature=0.1)  # p^10: 0.9^10 >> 0.1^10
    assert cold == 0 and byte_level.draw_byte(np.r_[0.9, 0.1, np.zeros(254)], 0.95, temperature=1.0) == 1


def test_queries_at_earlier_cuts_walk_from_states_kept_along_the_way(smollm2):
    """The byte lens moves the cut back and forth over one text: every answer equals a fresh one-call-per-step
    walk, and a cut behind the last one walks from the state kept at the last multiple of 16 bytes before it."""
    text = b'The "assert" statement:\n    assert identifier, naive; the value of __debug__ is True.'
    reference = ByteLevelModel(smollm2).stream(text, lookahead=False)
    model = ByteLevelModel(smollm2)
    for cut in (80, 70, 40, 47, 20, 79):
        before = model.calls
        dist = model.next_byte_distribution(text[:cut])
        np.testing.assert_allclose(dist.values, reference.probability.values[cut], atol=1e-5)
        assert model.prefix_logprob(text[:cut]) == pytest.approx(float(reference.prefix_logprob[cut - 1]), rel=1e-6)
        if cut != 80:  # the first one walks all 80 bytes; later ones at most the bytes after a kept state
            assert model.calls - before <= cut % 16 + 1, cut
    covers = model.covers(text[:79])  # from the state the last query kept
    assert sum(math.exp(lp) for *_, lp in covers) == pytest.approx(math.exp(model.prefix_logprob(text[:79])), rel=1e-9)


def test_chain_rule_on_smollm2(smollm2):
    model = ByteLevelModel(smollm2)
    text = "Naïve café, wor"
    ds = model.stream(text)
    np.testing.assert_allclose(ds.probability.sum("byte"), 1.0, atol=1e-5)
    total, direct = float(ds.logprob.sum()), float(ds.prefix_logprob[-1])
    assert total == pytest.approx(direct, rel=1e-4)
    assert direct == pytest.approx(model.prefix_logprob(text), abs=1e-12)
    assert ds.attrs["calls"] <= len(text.encode()) + 1
    # the covers summed are real model probabilities: check the best three with plain forward passes
    covers = model.covers("Naïve caf")
    assert float(np.logaddexp.reduce([c[2] for c in covers])) == pytest.approx(model.prefix_logprob("Naïve caf"),
                                                                                 abs=1e-9)
    vocab = vocab_bytes(smollm2.tokenizer)
    for ids, strings, logprob in covers[:3]:
        full = model.context_ids + list(ids)
        raw = sequence_logprobs(smollm2, full)
        p_byte = [1 - _special_mass(smollm2, vocab, full[: i + 1]) for i in range(len(model.context_ids) - 1,
                                                                                   len(full) - 1)]
        assert logprob == pytest.approx(float(raw[len(model.context_ids) - 1 :].sum() - np.log(p_byte).sum()),
                                        abs=2e-4)
        assert "".join(strings).encode().startswith("Naïve caf".encode())


def _special_mass(handle, vocab, ids) -> float:
    p = np.exp(last_token_logprobs(handle, ids).astype(np.float64))
    return float(p[vocab.special_ids].sum() / p.sum())


def _naive_from_earlier_cut(handle, prompt: bytes, k: int) -> np.ndarray:
    """Next-byte distribution after ``prompt`` when only ``prompt[:-k]`` is tokenized: tokens that spell
    ``prompt[-k:]`` and more, collapsed onto the byte after it (what a token-level model says)."""
    vocab = vocab_bytes(handle.tokenizer)
    ids = start_context(handle) + handle.tokenizer(prompt[:-k].decode(), add_special_tokens=False)["input_ids"]
    p = np.exp(last_token_logprobs(handle, ids).astype(np.float64))
    out = np.zeros(256)
    for t in vocab.tokens_starting_with(prompt[-k:]):
        if len(vocab.token_bytes[t]) > k:
            out[vocab.token_bytes[t][k]] += p[t]
    return out / out.sum()


@pytest.mark.parametrize("prompt", [b"The quick brown ", b"def f(n):\n    ret"])
def test_exact_does_not_depend_on_the_cut_naive_does(smollm2, prompt):
    exact = ByteLevelModel(smollm2).next_byte_distribution(prompt)
    # the same conditional from the cut one byte earlier: P(last b | prompt[:-1]) / P(last | prompt[:-1])
    earlier = ByteLevelModel(smollm2)
    base = earlier.prefix_logprob(prompt[:-1])
    first = float(earlier.next_byte_distribution(prompt[:-1]).sel(byte=prompt[-1]))
    assert math.exp(earlier.prefix_logprob(prompt) - base) == pytest.approx(first, rel=1e-4)
    top = np.argsort(-exact.values)[:5]
    for b in top:
        joint = math.exp(earlier.prefix_logprob(prompt + bytes([b])) - base)
        assert joint / first == pytest.approx(float(exact[b]), rel=1e-4, abs=1e-7)
    # (that a stream walking over the cut gives the same row is checked on random strings above)
    # the naive method answers differently depending on where the prompt's tokens end
    naive_here = naive_next_byte_distribution(smollm2, prompt)
    naive_earlier = _naive_from_earlier_cut(smollm2, prompt, 1)
    assert total_variation(naive_here, exact.copy(data=naive_earlier)) > 0.5
    assert total_variation(exact, naive_here) > 0.5


def test_cut_inside_a_utf8_character(smollm2):
    prefix = "café".encode()[:-1]  # b"caf\xc3": the first byte of é
    exact = ByteLevelModel(smollm2).next_byte_distribution(prefix)
    assert exact.values[0xA9] > 0.5  # é
    assert exact.values[0x80:0xC0].sum() > 0.99  # a UTF-8 continuation byte
    assert exact.values[0xC0] == 0 and 0xC0 in exact.attrs["impossible_bytes"]
    naive = naive_next_byte_distribution(smollm2, prefix)
    assert naive.values[0xA9] < exact.values[0xA9] and total_variation(exact, naive) > 0.5
    healed = token_healing_next_byte_distribution(smollm2, prefix)
    assert total_variation(exact, healed) < total_variation(exact, naive)


def test_gemma_byte_fallback_character(gemma3):
    swimsuit = "🩱"  # U+1FA71: Gemma's vocabulary spells it only with <0xNN> byte tokens
    vocab = vocab_bytes(gemma3.tokenizer)
    data = swimsuit.encode()
    assert len(vocab.tokens_starting_with(data)) == 0
    ids = gemma3.tokenizer(swimsuit, add_special_tokens=False)["input_ids"]
    assert [vocab.token_bytes[t] for t in ids] == [bytes([b]) for b in data]
    model = ByteLevelModel(gemma3)
    text = b"A " + data
    ds = model.stream(text)
    np.testing.assert_allclose(ds.probability.sum("byte"), 1.0, atol=1e-5)
    assert float(ds.logprob.sum()) == pytest.approx(float(ds.prefix_logprob[-1]), rel=1e-4)
    assert np.isfinite(ds.logprob).all()
    # no piece starts with a UTF-8 continuation byte, so every cover ends in four byte-fallback tokens
    covers = model.covers(text)
    assert covers
    for cover_ids, strings, _ in covers:
        assert [vocab.token_bytes[t] for t in cover_ids[-4:]] == [bytes([b]) for b in data]
        assert len(strings) == len(cover_ids)


# --------------------------------------------------------------------------- ensembles, sampling, comparisons


def test_ensemble_of_different_vocabularies(tiny, ab):
    byte_level = ByteLevelModel(tiny, prune=1e-4, max_hypotheses=16)
    two_letter = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    ens = ByteLevelEnsemble([byte_level, two_letter], weights=[3, 1])
    dist = ens.next_byte_distribution(b"ab")
    expected = 0.75 * byte_level.next_byte_distribution(b"ab").values + 0.25 * two_letter.next_byte_distribution(
        b"ab").values
    np.testing.assert_allclose(dist.values, expected, atol=1e-12)
    assert dist.sum().item() == pytest.approx(1.0, abs=1e-12)
    text = b"abba"
    ds = ens.stream(text)
    assert ds.member_probability.dims == ("member", "pos", "byte")
    bpb = bits_per_byte(ens, text)
    members = [bits_per_byte(m, text) for m in (byte_level, two_letter)]
    assert bpb == pytest.approx(-float(ds.logprob.sum()) / (len(text) * math.log(2)))
    assert bpb <= 0.75 * members[0] + 0.25 * members[1] + 1e-9  # log of a mixture >= mixture of logs
    with pytest.raises(ValueError, match="non-negative"):
        ByteLevelEnsemble([byte_level], weights=[-1])


def test_sampling_is_seeded_and_follows_the_distribution(ab):
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    first = model.sample(b"ab", n_bytes=6, seed=7)
    assert first == model.sample(b"ab", n_bytes=6, seed=7) and len(first) == 6
    assert set(first) <= set(b"ab")
    draws = [model.sample(b"ab", n_bytes=1, seed=s)[0] for s in range(200)]
    p_a = float(model.next_byte_distribution(b"ab").sel(byte=ord("a")))
    assert abs(np.mean([d == ord("a") for d in draws]) - p_a) < 4 * math.sqrt(p_a * (1 - p_a) / 200) + 0.01


def test_total_variation_and_kl_on_hand_built_distributions():
    p = xr.DataArray(np.r_[0.5, 0.5, np.zeros(254)], dims="byte", coords={"byte": np.arange(256)})
    q = xr.DataArray(np.r_[1.0, np.zeros(255)], dims="byte", coords={"byte": np.arange(256)})
    assert total_variation(p, q) == pytest.approx(0.5)
    assert kl_divergence(q, p) == pytest.approx(math.log(2))
    assert kl_divergence(p, q) == math.inf
    assert kl_divergence(p, p) == 0.0


def test_bad_input_is_explained(ab):
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None)
    with pytest.raises(ImpossiblePrefixError, match="byte 0x63 at offset 2"):
        model.next_byte_distribution(b"abc")
    with pytest.raises(TypeError, match="str or bytes"):
        model.next_byte_distribution(3)
    with pytest.raises(ValueError, match="prune"):
        ByteLevelModel(ab, prune=1.5)
    with pytest.raises(ValueError, match="non-empty text"):
        model.stream(b"")
    assert model.next_byte_distribution(b"ab").sum().item() == pytest.approx(1.0)  # usable after an error


def _common_bytes(vocab, covers) -> int:
    """Bytes spelled by the tokens every cover starts with."""
    ids = [c[0] for c in covers]
    k = next((i for i in range(min(map(len, ids))) if len({s[i] for s in ids}) > 1), min(map(len, ids)))
    return len(vocab.decode(ids[0][:k]))


def test_window_prunes_old_splits_and_accounts_for_them(ab):
    """With ``window``, tokenizations that split from the most probable ones more than ``window`` bytes back
    are pruned: on the float64 toy model, whose flat distributions keep every split alive, the exact
    P(x) (every cover, tested against enumeration above) minus the windowed one is at most the pruned mass
    reported, the chain rule holds with the pruned fractions, cuts up to ``window`` bytes are unchanged,
    and all covers share their tokens up to ``window`` bytes and one token before the cut."""
    text, window = b"abbabababbabbaab", 3
    exact = ByteLevelModel(ab, prune=0, max_hypotheses=None).stream(text)
    model = ByteLevelModel(ab, prune=0, max_hypotheses=None, window=window)
    ds = model.stream(text)
    assert ds.attrs["window"] == window and exact.attrs["window"] == -1
    assert float(ds.pruned_fraction.max()) > 0.01  # the window pruned real mass
    np.testing.assert_allclose(ds.probability[: window + 1], exact.probability[: window + 1], atol=1e-12)
    p_exact, p_window = math.exp(float(exact.prefix_logprob[-1])), math.exp(float(ds.prefix_logprob[-1]))
    assert 0 < p_exact - p_window <= math.exp(ds.attrs["pruned_logmass"]) * (1 + 1e-9)
    chain = float(ds.prefix_logprob[-1]) - float(np.log1p(-ds.pruned_fraction).sum())
    assert float(ds.logprob.sum()) == pytest.approx(chain, rel=1e-12)
    np.testing.assert_allclose(ds.probability.sum("byte"), 1.0, atol=1e-12)
    vocab = vocab_bytes(ab.tokenizer)
    for n in range(window + 2, len(text) + 1):
        covers = model.covers(text[:n])
        assert _common_bytes(vocab, covers) >= n - window - vocab.max_token_bytes, n
    with pytest.raises(ValueError, match="window"):
        ByteLevelModel(ab, window=0)


def test_window_bounds_what_a_long_text_keeps_on_smollm2(smollm2):
    """On the pydoc text whose run of asterisks keeps a tokenization that split at byte ~25 probable all through
    these 120 bytes (so without a window the shared trunk stops there and every followed history stays in memory), a
    window lets the trunk follow the cut: the same numbers before the window binds, the chain rule with
    the pruned fractions, the same numbers scored ahead or one call per step, and covers that agree on
    everything up to the window."""
    from workbench.corpus import load_corpus

    text, window = load_corpus("pydoc")[0]["text"][:120].encode(), 40
    ahead = ByteLevelModel(smollm2, window=window)
    ds = ahead.stream(text)
    step = ByteLevelModel(smollm2, window=window).stream(text, lookahead=False)
    free = ByteLevelModel(smollm2).stream(text[: window + 1])
    np.testing.assert_allclose(ds.probability[: window + 1], free.probability, atol=1e-5)
    assert (ds.n_tokenizations.values == step.n_tokenizations.values).all()
    np.testing.assert_allclose(ds.probability, step.probability, atol=1e-5)
    np.testing.assert_allclose(ds.pruned_fraction, step.pruned_fraction, rtol=1e-4, atol=1e-6)  # float32 rounding
    assert float(ds.pruned_fraction[window + 1 :].max()) > 1e-4  # the window pruned the asterisk split
    chain = float(ds.prefix_logprob[-1]) - float(np.log1p(-ds.pruned_fraction).sum())
    assert float(ds.logprob.sum()) == pytest.approx(chain, rel=1e-5)
    vocab = vocab_bytes(smollm2.tokenizer)
    covers = ahead.covers(text)
    assert _common_bytes(vocab, covers) >= len(text) - window - vocab.max_token_bytes
    # and so the scorer's shared trunk (what is not held per tokenization) followed the walk: nothing else,
    # such as tokenizations scored ahead for a pruned one, held it back
    scorer = ahead._scorer
    assert len(vocab.decode(scorer._trunk_ids)) >= len(text) - window - vocab.max_token_bytes
    assert _common_bytes(vocab, ByteLevelModel(smollm2).covers(text)) < 30  # without a window: the split at ~25


def test_pruning_on_a_flat_distribution_keeps_the_text_possible(tiny):
    """A random model spreads its mass over many long tokens: with a cap on hypotheses, pruning once kept
    only tokenizations inside a run of '*' (none could spell the '\\n' after it: ImpossiblePrefixError).
    A tokenization ending at each byte is now always kept; the pruned mass is accounted for."""
    text = b'The "assert" statement\n**********************\n\nAssert'
    model = ByteLevelModel(tiny, max_hypotheses=4)
    ds = model.stream(text)
    np.testing.assert_allclose(ds.probability.sum("byte"), 1.0, atol=1e-9)
    assert float(ds.pruned_fraction.max()) > 0  # the cap did prune
    assert int(ds.n_tokenizations.max()) <= 4
    # a window shorter than the 16-asterisk token once kept only tokenizations inside it, too
    windowed = ByteLevelModel(tiny, max_hypotheses=4, window=2).stream(text)
    np.testing.assert_allclose(windowed.probability.sum("byte"), 1.0, atol=1e-9)
    assert float(windowed.pruned_fraction.max()) > float(ds.pruned_fraction.max())
