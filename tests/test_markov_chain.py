"""The Markov-chain experiment of tokenization bias: chain, tokenizers, hand-built answers, a trained toy model, the study."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

import workbench as wb
from workbench.analyses import tokenization_bias as tb
from workbench.models.markov_chain import (
    MPE_TOKENS,
    MarkovChain,
    TrainingConfig,
    bpe_tokenizer,
    encode_corpus,
    mpe_tokenizer,
    tokenizer_tokens,
    train_toy_model,
)
from workbench.models import ModelHandle
from workbench.threads import single_thread
from workbench.plots.tokenization_bias import error_vs_steps, transition_heatmaps
from workbench.runs import RunExistsError
from workbench.studies import markov_chain as study

ALPHA, BETA = 0.7, 0.4  # P(A | A) and P(B | B) of the first-order chain used for hand-built answers


def _greedy(text: str, tokens) -> list[str]:
    """Maximum-prefix encoding written out directly: the longest token at each position."""
    out, pos = [], 0
    while pos < len(text):
        best = max((t for t in tokens if text.startswith(t, pos)), key=len)
        out.append(best)
        pos += len(best)
    return out


# --------------------------------------------------------------------------- the chain


def test_chain_samples_follow_its_transition_matrix():
    chain = MarkovChain.random(order=3, seed=5)
    texts = chain.sample(3000, 40, seed=2)
    assert len(texts) == 3000 and {len(t) for t in texts} == {40} and set("".join(texts)) == {"A", "B"}
    assert texts == chain.sample(3000, 40, seed=2) and texts != chain.sample(3000, 40, seed=3)
    counts = {c: np.zeros(2) for c in chain.contexts}
    for text in texts:
        for pos in range(3, 40):
            counts[text[pos - 3 : pos]][int(text[pos] == "B")] += 1
    for row, context in enumerate(chain.contexts):
        n = counts[context].sum()
        p = chain.transitions[row, 0]
        assert abs(counts[context][0] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), context
    first = np.array([t[0] == "A" for t in texts]).mean()
    assert abs(first - 0.5) < 4.5 * math.sqrt(0.25 / 3000)  # the first `order` characters are uniform
    matrix = chain.transition_matrix()
    assert matrix.dims == ("context", "next_char") and list(matrix.context.values[:2]) == ["AAA", "AAB"]
    np.testing.assert_allclose(matrix.sum("next_char"), 1.0)
    assert (matrix >= 0.1 - 1e-12).all()


def test_chain_log_probability_and_bad_input():
    chain = MarkovChain(("A", "B"), 1, [[ALPHA, 1 - ALPHA], [1 - BETA, BETA]])
    assert chain.log_probability("AAB") == pytest.approx(math.log(0.5 * ALPHA * (1 - ALPHA)))
    with pytest.raises(ValueError, match="probability distribution"):
        MarkovChain(("A", "B"), 1, [[0.5, 0.6], [0.5, 0.5]])
    with pytest.raises(ValueError, match="shape"):
        MarkovChain(("A", "B"), 2, [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="outside the alphabet"):
        chain.log_probability("AC")


# --------------------------------------------------------------------------- tokenizers


def test_mpe_is_greedy_longest_prefix_hand_built():
    tok = mpe_tokenizer(("A", "B", "AA", "ABB", "BAB", "BBA"))
    # AABBAB: at 0 "AA" (no AAB); at 2 "BBA"; at 5 "B". A shortest-cover encoder would pick A|ABB|AB...
    assert tok.convert_ids_to_tokens(tok("AABBAB")["input_ids"]) == ["<s>", "AA", "BBA", "B"]
    assert tok.convert_ids_to_tokens(tok("ABBA", add_special_tokens=False)["input_ids"]) == ["ABB", "A"]
    assert tok.convert_ids_to_tokens(tok("BABBA", add_special_tokens=False)["input_ids"]) == ["BAB", "B", "A"]
    assert tok.decode(tok("AABBAB", add_special_tokens=False)["input_ids"]) == "AABBAB"
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tokenizer_tokens(tok) == list(MPE_TOKENS)
    with pytest.raises(ValueError, match="token of its own"):
        mpe_tokenizer(("A", "AB"))


_MPE = mpe_tokenizer()
# The construction first suggested for MPE: WordPiece with an empty continuing prefix and no pre-tokenizer.
_WORDPIECE = Tokenizer(models.WordPiece(vocab=_MPE.get_vocab(), unk_token="</s>", continuing_subword_prefix="",
                                        max_input_chars_per_word=10**6))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="AB", min_size=1, max_size=60))
def test_mpe_equals_direct_greedy_and_wordpiece(text):
    got = _MPE.convert_ids_to_tokens(_MPE(text, add_special_tokens=False)["input_ids"])
    assert got == _greedy(text, MPE_TOKENS)
    assert _WORDPIECE.encode(text).tokens == got


def test_bpe_tokenizer_learns_multi_character_tokens_and_round_trips():
    from workbench.tokenization.vocab_bytes import vocab_bytes

    corpus = MarkovChain.random(seed=1).sample(300, 32, seed=0)
    tok = bpe_tokenizer(corpus, n_merges=5)
    tokens = tokenizer_tokens(tok)
    assert tokens[:2] == ["A", "B"] and len(tokens) == 7 and all(len(t) >= 2 for t in tokens[2:])
    for text in corpus[:20]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text
    for t in (tok, _MPE):  # the exact byte-level model reads both vocabularies as plain bytes
        assert vocab_bytes(t).scheme == "plain"
    ids, labels = encode_corpus(tok, corpus[:3])
    first = tok(corpus[0])["input_ids"] + [tok.eos_token_id]  # <s> encode(text) </s>, every token a target
    assert ids[0, : len(first)].tolist() == first and labels[0, : len(first)].tolist() == first
    assert (labels[0, len(first) :] == -100).all()


# --------------------------------------------------------------------------- a hand-built model


def _bigram_llama(tokenizer, table: dict[str, dict[str, float]]) -> ModelHandle:
    """A real LlamaForCausalLM whose next-token distribution is ``table[last token]``, set by hand.

    Attention and MLP outputs are zeroed, so the final residual is the current token's
    embedding: a scaled one-hot that the final RMSNorm maps to the exact one-hot; the
    (untied) unembedding then holds ``log p(next | last)`` in column ``last``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = tokenizer.get_vocab()
    size = len(vocab)
    config = LlamaConfig(vocab_size=size, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :size] = 100.0 * torch.eye(size)
        model.model.norm.weight[:] = 1.0 / math.sqrt(8)
        model.lm_head.weight[:] = -40.0
        for last, row in table.items():
            for nxt, p in row.items():
                model.lm_head.weight[vocab[nxt], vocab[last]] = math.log(p)
    return ModelHandle("bigram-by-hand", model, tokenizer, "hand-built", "none")


def _first_order_mpe_model() -> tuple[MarkovChain, ModelHandle]:
    """The first-order chain P(A|A)=ALPHA, P(B|B)=BETA tokenised by MPE over {A, B, AA}, as an exact token model.

    Under MPE, token "A" is emitted only when the next character is B (an A would have made
    "AA"), so after "A" the next token is "B" for sure; after "AA" or "B" the next character
    follows the chain and becomes "AA" when the one after it is A too.
    """
    a, b = ALPHA, BETA
    table = {
        "<s>": {"AA": 0.5 * a, "A": 0.5 * (1 - a), "B": 0.5},
        "A": {"B": 1.0},
        "AA": {"AA": a * a, "A": a * (1 - a), "B": 1 - a},
        "B": {"AA": (1 - b) * a, "A": (1 - b) * (1 - a), "B": b},
    }
    chain = MarkovChain(("A", "B"), 1, [[a, 1 - a], [1 - b, b]])
    return chain, _bigram_llama(mpe_tokenizer(("A", "B", "AA")), table)


def test_naive_estimate_on_a_hand_built_model_gives_the_known_biased_answer():
    chain, handle = _first_order_mpe_model()
    with single_thread():
        naive = tb.naive_transitions(handle, ["A", "B", "AA", "BA"], ["A", "B"]).probability
    # By hand: prompt "A" = <s>|A, and after the token A the next token is B: P_naive(A | A) = 0, not 0.7.
    np.testing.assert_allclose(naive.sel(context="A").values, [0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(naive.sel(context="BA").values, [0.0, 1.0], atol=1e-9)
    # Prompts ending in the tokens B or AA carry no hidden constraint: the chain's answer.
    np.testing.assert_allclose(naive.sel(context="B").values, [1 - BETA, BETA], atol=1e-9)
    np.testing.assert_allclose(naive.sel(context="AA").values, [ALPHA, 1 - ALPHA], atol=1e-9)
    limit = tb.naive_limit_transitions(chain, handle.tokenizer, lookahead=4).probability
    np.testing.assert_allclose(limit.values, [[0.0, 1.0], [1 - BETA, BETA]], atol=1e-12)


def test_exact_estimate_on_the_hand_built_model_recovers_the_chain():
    chain, handle = _first_order_mpe_model()
    with single_thread():
        estimates = tb.transition_estimates(handle, chain, lookahead=4)
    p = estimates.probability
    assert p.dims == ("estimate", "context", "next_char") and list(p.estimate.values) == list(tb.ESTIMATES)
    np.testing.assert_allclose(p.sel(estimate="exact"), chain.transitions, atol=1e-6)
    np.testing.assert_allclose(p.sel(estimate="naive").sel(context="A"), [0.0, 1.0], atol=1e-9)
    errors = tb.transition_errors(estimates)
    assert float(errors.max_abs_error.sel(estimate="exact")) < 1e-6
    assert float(errors.max_abs_error.sel(estimate="naive")) == pytest.approx(ALPHA, abs=1e-6)
    assert float(errors.mean_abs_error.sel(estimate="naive")) == pytest.approx(ALPHA / 2, abs=1e-6)
    with pytest.raises(ValueError, match="no 'true' estimate"):
        tb.transition_errors(estimates.sel(estimate=["naive", "exact"]))


# --------------------------------------------------------------------------- training and the study


def _brute_force_next_char(handle, prefix: str, alphabet) -> np.ndarray:
    """P(c | prefix) by listing every cover encoding of prefix + c, one full forward pass per token sequence.

    ``P(x) = sum over token sequences t_1..t_k with t_1..t_{k-1} spelling a strict prefix of x
    and t_1..t_k spelling x or more``, each weighted by the product of next-token
    probabilities renormalised over non-special tokens (the byte-token-conditioned model the
    exact byte-level module defines). Independent of workbench.analyses.byte_level.
    """
    tok = handle.tokenizer
    special = set(tok.all_special_ids)
    vocab = {i: t for t, i in tok.get_vocab().items() if i not in special}

    def q(ids):
        with torch.no_grad():
            p = torch.softmax(handle.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
        keep = np.array([i in vocab for i in range(len(p))])
        return np.where(keep, p, 0.0) / p[keep].sum()

    def prob(x, ids, pos):
        dist, total = q(ids), 0.0
        for i, t in vocab.items():
            if t.startswith(x[pos:]):
                total += dist[i]
            elif x[pos:].startswith(t):
                total += dist[i] * prob(x, ids + [i], pos + len(t))
        return total

    start = [tok.bos_token_id]
    values = np.array([prob(prefix + c, start, 0) for c in alphabet])
    return values / values.sum()


def test_exact_estimate_equals_brute_force_cover_enumeration():
    chain = MarkovChain.random(seed=0)
    corpus = chain.sample(200, 16, seed=1)
    config = TrainingConfig(steps=8, batch_size=8, checkpoint_steps=(8,), hidden_size=32, intermediate_size=32)
    for tokenizer in (mpe_tokenizer(), bpe_tokenizer(corpus, 4)):
        handle = train_toy_model(tokenizer, corpus, config, progress=False)[8]
        contexts = ["AAB", "BAB", "ABBA"]
        with single_thread():
            exact = tb.exact_transitions(handle, contexts, ["A", "B"])
            brute = np.array([_brute_force_next_char(handle, x, "AB") for x in contexts])
        np.testing.assert_allclose(exact.probability.values, brute, atol=1e-5)
        assert ((exact.outside_mass > 0) & (exact.outside_mass < 1)).all()  # </s> keeps some mass mid-text



def test_short_training_run_end_to_end(tmp_path):
    chain = MarkovChain.random(seed=0)
    corpus = chain.sample(200, 16, seed=1)
    config = TrainingConfig(steps=6, batch_size=8, checkpoint_steps=(3, 6), hidden_size=32, intermediate_size=32)
    checkpoints = {
        "mpe": train_toy_model(mpe_tokenizer(), corpus, config, save_dir=tmp_path / "mpe", progress=False),
        "bpe": train_toy_model(bpe_tokenizer(corpus, 3), corpus, config, progress=False),
    }
    assert sorted(checkpoints["mpe"]) == [3, 6]
    again = train_toy_model(mpe_tokenizer(), corpus, config, progress=False)  # seeded: the same weights
    assert again[6].file_hash == checkpoints["mpe"][6].file_hash != checkpoints["mpe"][3].file_hash
    loaded = wb.load_model(str(tmp_path / "mpe" / "step-6"))
    ids = torch.tensor([loaded.tokenizer("AABBA")["input_ids"]])
    torch.testing.assert_close(loaded.hf_model(input_ids=ids).logits, checkpoints["mpe"][6].hf_model(input_ids=ids).logits)
    with single_thread():
        sweep = tb.checkpoint_sweep(checkpoints, chain, progress=False)
    assert sweep.probability.dims == ("tokenizer", "step", "estimate", "context", "next_char")
    assert sweep.max_abs_error.dims == ("tokenizer", "step", "estimate")
    assert list(sweep.step.values) == [3, 6] and list(sweep.tokenizer.values) == ["mpe", "bpe"]
    np.testing.assert_allclose(sweep.probability.sum("next_char", skipna=False).fillna(1.0), 1.0)  # NaN: naive limit undefined
    with pytest.raises(ValueError, match="checkpoint steps"):
        TrainingConfig(steps=5, checkpoint_steps=(10,))


def test_trained_model_exact_recovers_truth_and_naive_stays_biased():
    """The paper's claim on a small trained model (about 20-40 s on a loaded 2-core CPU)."""
    chain = MarkovChain.random(seed=0)
    corpus = chain.sample(4000, 32, seed=1)
    config = TrainingConfig(steps=300, batch_size=64, checkpoint_steps=(300,))
    for tokenizer in (mpe_tokenizer(), bpe_tokenizer(corpus)):
        handle = train_toy_model(tokenizer, corpus, config, progress=False)[300]
        with single_thread():
            errors = tb.transition_errors(tb.transition_estimates(handle, chain))
        exact, naive, limit = (errors.sel(estimate=e) for e in ("exact", "naive", "naive_limit"))
        assert float(exact.max_abs_error) < 0.15 and float(exact.mean_abs_error) < 0.06, tokenizer.name_or_path
        assert float(naive.max_abs_error) > 0.3 and float(naive.mean_abs_error) > 3 * float(exact.mean_abs_error)
        # ... and naive prompting is biased because of the tokens: a perfect model would be just as wrong.
        assert float(limit.mean_abs_error) > 0.1


def test_study_saves_loads_and_writes_figures(tmp_path):
    config = study.StudyConfig(n_sequences=200, length=16,
                               training=TrainingConfig(steps=4, batch_size=8, checkpoint_steps=(2, 4), hidden_size=32,
                                                       intermediate_size=32))
    folder = study.run_study(tmp_path / "mc", config, progress=False)
    assert not (tmp_path / "mc.partial").exists()
    assert (folder / "checkpoints" / "bpe" / "step-4" / "config.json").exists()
    results = study.load_study(folder)
    assert results.probability.dims == ("tokenizer", "step", "estimate", "context", "next_char")
    assert results.training_loss.dims == ("tokenizer", "step")
    assert study.load_study(folder).identical(results)
    with pytest.raises(RunExistsError, match="overwrite=True"):
        study.run_study(tmp_path / "mc", config, progress=False)
    table = study.summary_table(folder)
    assert "| | mpe | bpe |" in table and "mean abs error, exact / naive (step 4)" in table
    naive = float(results.mean_abs_error.sel(tokenizer="bpe", step=4, estimate="naive"))
    assert f"{naive:.3f}" in table
    assert re.search(r"\| tokens \| A B AA ABB BAB BBA \|", table)
    written = study.write_figures(results, tmp_path / "gallery", formats=("svg",))
    assert sorted(p.name for p in written) == ["error_vs_steps.svg", "transition_heatmaps.svg"]
    assert study.write_summary(results, tmp_path / "gallery" / "summary.md").read_text().startswith("# Tokenization")
    with pytest.raises(FileNotFoundError, match="run_study"):
        study.load_study(tmp_path / "nothing")


def test_figures_have_a_panel_per_estimate_and_a_line_per_curve():
    chain, handle = _first_order_mpe_model()
    with single_thread():
        estimates = tb.transition_estimates(handle, chain, lookahead=4)
    fig = transition_heatmaps(estimates.probability)
    assert len(fig.data) == len(tb.ESTIMATES)
    np.testing.assert_allclose(fig.data[0].z, chain.transitions)
    sweep = xr.concat([tb.transition_errors(estimates)] * 2, dim=xr.DataArray([1, 2], dims="step", name="step"))
    sweep = sweep.expand_dims(tokenizer=["mpe"])
    fig = error_vs_steps(sweep)
    assert len(fig.data) == 2 * (len(tb.ESTIMATES) - 1)  # mean and max panels, every estimate but the truth
    with pytest.raises(ValueError, match="select one training step"):
        transition_heatmaps(sweep.abs_error)
