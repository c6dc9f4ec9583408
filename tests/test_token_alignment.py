"""Token alignment ("Token Alignment via Character Matching for Subword Completion", Athiwaratkun et al.):
the constraint set, exactness of the re-spelled text, plain completion against Hugging Face greedy
decoding, method log-probabilities against the exact cover sum, the evaluation, figure and study."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.analyses.byte_level import ByteLevelModel, start_context
from workbench.analyses.token_alignment import _allowed_ids, aligned_completion, continuation_logprob, plain_completion
from workbench.analyses.token_alignment_evaluation import (
    match_rates,
    next_word,
    sample_cuts,
    token_alignment_evaluation,
)
from workbench.threads import single_thread
from workbench.plots.token_alignment import match_rate_bars
from workbench.tokenization.vocab_bytes import vocab_bytes

PROMPTS = [
    "The quick brown fo",
    "def f(x):\n    ret",
    "Attention sinks appear on the fir",
    "naïve café, ünïco",
    "x = [1, 2, 3]  ",
    "Hello",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One-token forward passes of small models: more threads only add contention on a shared machine.
    with single_thread():
        yield


def _encode(handle, text):
    return handle.tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(handle, ids, n):
    """Greedy decoding by full forward passes (no cache): the independent reference."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = handle.hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            t = int(torch.argmax(logits))
            out.append(t)
            ids.append(t)
    return out


# --------------------------------------------------------------------------- the constraint


def test_allowed_set_equals_brute_force_definition(tiny):
    vocab = vocab_bytes(tiny.tokenizer)
    for rest in [b" fo", b"o", b"ret", b"  ", b"\xc3", b"\n    ret", b"zzzqqq"]:
        expected = {t for t, b in enumerate(vocab.token_bytes) if b is not None
                    and (b.startswith(rest) or (rest.startswith(b) and len(b) < len(rest)))}
        assert set(_allowed_ids(vocab, rest).tolist()) == expected, rest


def test_aligned_completion_always_re_spells_the_dropped_text(tiny):
    vocab = vocab_bytes(tiny.tokenizer)
    for prompt in PROMPTS:
        ids = _encode(tiny, prompt)
        for k in range(min(3, len(ids)) + 1):
            for sample, seed in [(False, 0), (True, 1)]:
                c = aligned_completion(tiny, prompt, max_new_tokens=4, back_off=k, sample=sample, seed=seed)
                assert c.back_off == k
                assert c.dropped == vocab.decode(ids[len(ids) - k :])
                assert c.generated.startswith(c.dropped)
                # the whole byte stream is the prompt followed by the completion
                assert vocab.decode(ids[: len(ids) - k] + list(c.token_ids)) == prompt.encode() + c.data
                assert (c.constrained_steps >= 1) == (k >= 1)
                # each constrained token was in the allowed set of what was left to match
                rest = c.dropped
                for t in c.token_ids[: c.constrained_steps]:
                    b = vocab.token_bytes[t]
                    assert b.startswith(rest) or (rest.startswith(b) and len(b) < len(rest))
                    rest = rest[len(b) :] if not b.startswith(rest) else b""
                assert rest == b""


def test_back_off_zero_is_plain_and_sampling_is_seeded(tiny):
    for prompt in PROMPTS[:3]:
        plain = plain_completion(tiny, prompt, max_new_tokens=6)
        zero = aligned_completion(tiny, prompt, max_new_tokens=6, back_off=0)
        assert (zero.text, zero.token_ids, zero.method, plain.method) == (plain.text, plain.token_ids, "plain", "plain")
        assert zero.constrained_steps == 0 and zero.dropped == b""
        a = aligned_completion(tiny, prompt, max_new_tokens=6, sample=True, seed=3, temperature=2.0)
        b = aligned_completion(tiny, prompt, max_new_tokens=6, sample=True, seed=3, temperature=2.0)
        assert a.token_ids == b.token_ids
    draws = {aligned_completion(tiny, PROMPTS[0], max_new_tokens=4, sample=True, seed=s, temperature=3.0).token_ids
             for s in range(6)}
    assert len(draws) > 1  # the seed matters


def test_plain_completion_is_greedy_decoding_of_the_encoded_prompt(tiny):
    for prompt in PROMPTS[:4]:
        ids = start_context(tiny) + _encode(tiny, prompt)
        c = plain_completion(tiny, prompt, max_new_tokens=6)
        stopped = c.stop_reason == "special_token"
        reference = _hf_greedy(tiny, ids, len(c.token_ids) + stopped)
        assert list(c.token_ids) == reference[: len(c.token_ids)]
        if stopped:  # the model chose a token that spells nothing
            assert vocab_bytes(tiny.tokenizer).token_bytes[reference[-1]] is None
        else:
            assert c.stop_reason == "max_new_tokens" and len(c.token_ids) == 6
        assert c.calls == len(c.token_ids) + stopped  # the context pass, then one per token before the last


def _tokens_adding_bytes(vocab, completion):
    """Generated tokens that spell bytes past the prompt's end (what max_new_tokens counts)."""
    rest, n = completion.dropped, 0
    for t in completion.token_ids:
        b = vocab.token_bytes[t]
        if rest and not b.startswith(rest):
            rest = rest[len(b) :]
            continue
        n += len(b) > len(rest)
        rest = b""
    return n


def test_stopping_rules(tiny):
    vocab = vocab_bytes(tiny.tokenizer)
    c = aligned_completion(tiny, "The quick brown fo", max_new_tokens=50, max_new_bytes=5)
    assert c.stop_reason == "max_new_bytes" and 5 <= len(c.data) < 5 + vocab.max_token_bytes
    c = aligned_completion(tiny, "The quick brown fo", max_new_tokens=2, back_off=2)
    assert c.stop_reason == "max_new_tokens" and _tokens_adding_bytes(vocab, c) == 2


def test_smollm2_completes_the_cut_word(smollm2):
    prompt = "The quick brown fo"
    aligned = aligned_completion(smollm2, prompt, max_new_tokens=6)
    plain = plain_completion(smollm2, prompt, max_new_tokens=6)
    assert aligned.dropped == b" fo" and aligned.tokens[0] == " fox"
    assert next_word(aligned.text) == "x"  # "... brown fox"
    reference = _hf_greedy(smollm2, start_context(smollm2) + _encode(smollm2, prompt), len(plain.token_ids))
    assert list(plain.token_ids) == reference
    assert next_word(plain.text) != "x"  # the partial token ' fo' leads SmolLM2 astray ('xtrot')


# --------------------------------------------------------------------------- scoring


def test_plain_logprob_is_the_exact_cover_sum(tiny, smollm2):
    for handle, prompt, continuation in [(tiny, "The quick brown fo", "x jumps"), (tiny, "def f(x):\n    ret", "urn x"),
                                         (smollm2, "The quick brown fo", "x jumps")]:
        score = continuation_logprob(handle, prompt, continuation, back_off=0, prune=0, max_nodes=10_000)
        exact = ByteLevelModel(handle, prune=0, max_hypotheses=None,
                               context_ids=start_context(handle) + _encode(handle, prompt))
        assert score.logprob == pytest.approx(exact.prefix_logprob(continuation), abs=1e-4)
        assert score.pruned_mass == 0


def test_aligned_next_byte_probabilities_sum_to_one(tiny):
    # The aligned process is a proper distribution over byte streams after the prompt, so the
    # 256 first-byte probabilities add up to 1 (back-off 2: "I a" re-spelled under the constraint).
    for prompt, k in [("The quick brown fo", 0), ("The quick brown fo", 1), ("I a", 2)]:
        total = sum(math.exp(continuation_logprob(tiny, prompt, bytes([b]), back_off=k, prune=0,
                                                  max_nodes=10_000).logprob) for b in range(256))
        assert total == pytest.approx(1.0, abs=1e-4)


def test_aligned_logprob_helps_on_a_cut_word(smollm2):
    plain = continuation_logprob(smollm2, "The quick brown fo", "x jumps", back_off=0)
    aligned = continuation_logprob(smollm2, "The quick brown fo", "x jumps", back_off=1)
    assert aligned.logprob > plain.logprob + 5  # measured -3.9 vs -23.9 nats


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(tiny):
    empty_plain = plain_completion(tiny, "", max_new_tokens=3)
    empty_aligned = aligned_completion(tiny, "", max_new_tokens=3, back_off=2)
    assert empty_aligned.back_off == 0 and empty_aligned.token_ids == empty_plain.token_ids  # documented behaviour
    for prompt in ("<|endoftext|>", "<|im_start|><|im_end|>"):
        with pytest.raises(ValueError, match="special tokens only"):
            aligned_completion(tiny, prompt)
    with pytest.raises(ValueError, match="cannot back off over the special token"):
        aligned_completion(tiny, "Hello<|im_end|>", back_off=1)
    with pytest.raises(ValueError, match="is only 1 token"):
        aligned_completion(tiny, "Hello", back_off=2)
    with pytest.raises(ValueError, match="context of 256"):
        aligned_completion(tiny, "word " * 300)
    with pytest.raises(ValueError, match="context of 256"):
        plain_completion(tiny, "word " * 240, max_new_tokens=20)
    with pytest.raises(ValueError, match="back_off"):
        aligned_completion(tiny, "Hello", back_off=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        aligned_completion(tiny, "Hello", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        aligned_completion(tiny, "Hello", sample=True, temperature=0)
    with pytest.raises(TypeError, match="prompt must be a str"):
        aligned_completion(tiny, b"Hello")
    with pytest.raises(ValueError, match="continuation is empty"):
        continuation_logprob(tiny, "Hello", "")
    with pytest.raises(ValueError, match="n_prompts"):
        sample_cuts(["some text that is long enough to cut"], 0)
    with pytest.raises(ValueError, match="room for"):
        sample_cuts({"short": ["too short"]}, 1)


# --------------------------------------------------------------------------- evaluation


def test_next_word_hand_built():
    assert next_word("x jumps") == "x"
    assert next_word(" fox jumps") == " fox"
    assert next_word("\n    return x") == "\n    return"
    assert next_word("(a, b)") == "("
    assert next_word("") == ""


def test_sample_cuts_are_seeded_distinct_and_in_range():
    texts = {"a": ["x" * 40, "y" * 100], "b": ["z" * 60]}
    cuts = sample_cuts(texts, 10, seed=4)
    assert cuts == sample_cuts(texts, 10, seed=4) and cuts != sample_cuts(texts, 10, seed=5)
    assert len(set(cuts)) == 20 and [c[0] for c in cuts] == ["a"] * 10 + ["b"] * 10
    assert all(16 <= cut <= len(texts[d][i]) - 16 for d, i, cut in cuts)
    assert sample_cuts(texts, 10, seed=4)[10:] == sample_cuts({"a": ["w" * 50], "b": texts["b"]}, 10, seed=4)[10:]


def test_evaluation_dataset(tiny):
    texts = {"prose": ["The cat sat on the mat and looked out of the window at the rain for a long while."],
             "code": ["def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"]}
    ds = token_alignment_evaluation(tiny, texts, 3, seed=1, back_offs=(1, 2), max_new_bytes=12)
    assert dict(ds.sizes) == {"prompt": 6, "decoding": 3}
    assert list(ds.decoding.values) == ["plain", "aligned-1", "aligned-2"]
    vocab = vocab_bytes(tiny.tokenizer)
    for i in range(6):
        one = ds.isel(prompt=i)
        text = texts[str(one.domain.values)][int(one.text_index)]
        prompt, truth = text[: int(one.cut)], text[int(one.cut) :]
        assert str(one.prompt_text.values) == prompt and truth.startswith(str(one.continuation_text.values))
        ids = _encode(tiny, text)
        ends = set(np.cumsum([len(vocab.token_bytes[t]) for t in ids]).tolist())
        assert bool(one.cut_inside_token) == (len(prompt.encode()) not in ends)
        for m in ds.decoding.values:
            c = one.sel({"decoding": m})
            completion = str(c.completion.values)
            assert bool(c.word_match) == (next_word(completion) == next_word(truth))
            assert bool(c.prefix_match) == (completion[:8] == truth[:8])
            assert np.isfinite(float(c.continuation_logprob)) and float(c.continuation_logprob) <= 0
        # the evaluation's plain completion is the standalone one
        assert str(one.completion.sel({"decoding": "plain"}).values) == plain_completion(
            tiny, prompt, max_new_tokens=24, max_new_bytes=12).text
    assert (ds.constrained_steps.sel({"decoding": "plain"}) == 0).all()
    assert (ds.constrained_steps.sel({"decoding": "aligned-2"}) >= 1).all()


def test_match_rates_hand_built():
    import xarray as xr

    ds = xr.Dataset(
        {"word_match": (("prompt", "decoding"), np.array([[0, 1], [0, 1], [0, 0], [1, 1]], dtype=bool)),
         "prefix_match": (("prompt", "decoding"), np.zeros((4, 2), dtype=bool)),
         "continuation_logprob": (("prompt", "decoding"),
                                  np.array([[-4.0, -1.0], [-2.0, -1.0], [-3.0, -2.0], [-1, -1]])),
         "cut_inside_token": ("prompt", np.array([True, True, True, False]))},
        coords={"decoding": ["plain", "aligned-1"], "domain": ("prompt", ["a", "a", "a", "b"])},
    )
    rates = match_rates(ds)
    assert rates.rate.sel(metric="word_match", domain="a").values.tolist() == pytest.approx([0, 2 / 3])
    assert rates.n.values.tolist() == [3, 1]
    # Wilson interval for 0 of 3: [0, z^2 / (n + z^2)], z the 97.5% normal quantile
    z = 1.959963984540054
    assert float(rates.high.sel(metric="prefix_match", domain="a", decoding="plain")) == pytest.approx(z**2 / (3 + z**2))
    assert rates.mean_logprob.sel(domain="a").values.tolist() == pytest.approx([-3.0, -4 / 3])
    inside = match_rates(ds, subset="at_boundary")
    assert inside.n.values.tolist() == [0, 1] and np.isnan(inside.rate.sel(domain="a")).all()
    with pytest.raises(ValueError, match="subset"):
        match_rates(ds, subset="nope")
    fig = match_rate_bars(rates)
    assert len(fig.data) == 4 and {t.name for t in fig.data} == {"plain", "aligned-1"}
    with pytest.raises(ValueError, match="match_rates"):
        match_rate_bars(rates.drop_vars("low"))


def test_study_saves_loads_and_writes_figures(tiny, tmp_path):
    from workbench.studies import token_alignment as study

    config = study.StudyConfig(n_prompts=2, back_offs=(1, 2), max_new_bytes=10)
    folder = study.run_study(tiny, tmp_path / "study", config, progress=False)
    results = study.load_study(folder)
    assert dict(results.sizes) == {"prompt": 4, "decoding": 3} and results.attrs["model"] == "tiny-random-llama"
    table = study.summary_table(folder)
    assert "| | prose | code |" in table and "next word exact match, all cuts" in table
    md = study.write_summary(folder, tmp_path / "g" / "token_alignment.md")
    assert md.read_text().startswith("# Token alignment")
    written = study.write_figures(folder, tmp_path / "g", formats=("svg",))
    assert [p.name for p in written] == ["token_alignment_tiny-random-llama.svg"] and written[0].stat().st_size > 0
    with pytest.raises(FileExistsError):
        study.run_study(tiny, folder, config, progress=False)
    from workbench.studies.registry import STUDIES

    entry = STUDIES["token-alignment"]  # a rerun with other options says which differ (and reruns)
    assert entry.options_changed(folder, {"prompts": 2, "back_offs": "1, 2", "seed": 0}) == ""
    assert entry.options_changed(folder, {"prompts": 40, "back_offs": "1", "seed": 0}) == "prompts=2, back_offs='1,2'"
