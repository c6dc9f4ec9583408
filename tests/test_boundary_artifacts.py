"""Boundary artifacts: digit chunking on hand-built tokenizers with known rules, segmentations against a
brute-force enumeration, and the model numbers against Hugging Face's own forward pass."""

import itertools

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workbench.analyses.boundary_artifacts import (
    digit_chunking, noncanonical_tokenizations, segmentations, sum_logprobs, sum_prompt,
)
from workbench.analyses.byte_level import start_context
from workbench.tokenization.vocab_bytes import vocab_bytes


def digit_tokenizer(pattern):
    """Digit strings of up to 3 digits are tokens; the pre-tokenizer's regex decides how numbers are cut."""
    vocab = {"[UNK]": 0, **{"".join(d): i + 1 for i, d in enumerate(
        itertools.chain.from_iterable(itertools.product("0123456789", repeat=n) for n in (1, 2, 3)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("pattern, rule, seven", [
    (r"\d", "single digits", "1-1-1-1-1-1-1"),
    (r"\d{1,3}", "left to right, up to 3", "3-3-1"),
    (r"\d{1,3}(?=(?:\d{3})*$)", "right to left, up to 3", "1-3-3"),
])
def test_digit_chunking_rules(pattern, rule, seven):
    out = digit_chunking(digit_tokenizer(pattern), lengths=range(1, 10), samples=5)
    assert out.attrs["rule"] == rule
    assert str(out.pattern.sel(length=7).item()) == seven


def test_embedded_tokenizers_split_digits_one_by_one(smollm2, gemma3):
    for handle in (smollm2, gemma3):
        assert digit_chunking(handle.tokenizer, lengths=range(1, 8), samples=5).attrs["rule"] == "single digits"
        assert len(handle.tokenizer.tokenize("20481024")) == 8


def test_sum_prompt_known_text():
    prompt, answer = sum_prompt(12345, 67890, separators=True)
    assert prompt.endswith("\n12,345 + 67,890 =") and answer == " 80,235"
    assert "31,562 + 50,417 = 81,979" in prompt
    assert sum_prompt(12, 30, separators=False)[1] == " 42"


def brute_force_segmentations(vocab_set, data):
    """Every composition of ``data`` (2^(n-1) ways to cut it) whose pieces are all in the vocabulary."""
    out = []
    for cuts in itertools.product([0, 1], repeat=len(data) - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                pieces.append(data[start:i])
                start = i
        pieces.append(data[start:])
        if all(p in vocab_set for p in pieces):
            out.append(tuple(pieces))
    return out


def test_segmentations_match_brute_force(smollm2):
    vocab = vocab_bytes(smollm2.tokenizer)
    vocab_set = {b for b in vocab.token_bytes if b is not None}
    for word in (b" wonderful", b"tokenizer", b" caf\xc3\xa9"):
        found = segmentations(vocab, word, limit=10_000)
        spelled = sorted(tuple(vocab.token_bytes[t] for t in s) for s in found)
        assert spelled == sorted(brute_force_segmentations(vocab_set, word))
        assert [len(s) for s in found] == sorted(len(s) for s in found)
    with pytest.raises(ValueError, match="empty"):
        segmentations(vocab, b"")


def hf_answer_logprob(handle, start, prompt_ids, answer_ids):
    ids = torch.tensor([start + prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(handle.hf_model(input_ids=ids).logits[0].double(), -1)
    n = len(start) + len(prompt_ids)
    return float(sum(logprobs[n - 1 + i, t] for i, t in enumerate(answer_ids)))


def test_sum_logprobs_equal_hugging_face(smollm2):
    out = sum_logprobs(smollm2, digits=(3,), problems=2, seed=5)
    import random
    rng = random.Random(5)
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    tok, start = smollm2.tokenizer, start_context(smollm2)
    for k, sep in enumerate((False, True)):
        prompt, answer = sum_prompt(a, b, sep)
        p = tok.encode(prompt, add_special_tokens=False)
        full = tok.encode(prompt + answer, add_special_tokens=False)
        expected = hf_answer_logprob(smollm2, start, p, full[len(p):])
        assert float(out.logprob.sel(digits=3, problem=0).isel(format=k)) == pytest.approx(expected, abs=1e-3)
    assert int(out.answer_tokens.sel(digits=3, problem=0, format="separators")) == int(
        out.answer_tokens.sel(digits=3, problem=0, format="plain")) + (1 if a + b >= 1000 else 0)


def test_noncanonical_tokenizations_against_hugging_face(smollm2):
    out = noncanonical_tokenizations(smollm2, "The weather today is", " wonderful", limit=6)
    assert bool(out.canonical[0]) and out.tokens.values[0] == " wonderful" and int(out.canonical.sum()) == 1
    assert float(out.logprob[0]) > float(out.logprob[1:].max())  # the model prefers the spelling it was trained on
    np.testing.assert_allclose(out.cosine.values[0], 1.0, atol=1e-6)
    tok, start = smollm2.tokenizer, start_context(smollm2)
    ctx = start + tok.encode("The weather today is", add_special_tokens=False)
    vocab = vocab_bytes(tok)
    pieces = out.tokens.values[2].split("|")
    ids = [vocab.tokens_equal_to(p.encode())[0] for p in pieces]
    assert float(out.logprob[2]) == pytest.approx(hf_answer_logprob(smollm2, [], ctx, ids), abs=1e-3)
    with torch.no_grad():  # HF hidden_states[l + 1] is the residual after block l (the last one is after the final norm)
        a = smollm2.hf_model(input_ids=torch.tensor([ctx + list(tok.encode(" wonderful"))]), output_hidden_states=True)
        b = smollm2.hf_model(input_ids=torch.tensor([ctx + ids]), output_hidden_states=True)
    for layer in (0, 10, smollm2.n_layers - 2):
        expected = torch.nn.functional.cosine_similarity(a.hidden_states[layer + 1][0, -1].double(),
                                                         b.hidden_states[layer + 1][0, -1].double(), dim=0)
        assert float(out.cosine.sel(layer=layer)[2]) == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="token boundary"):
        noncanonical_tokenizations(smollm2, "The weather today is ", "wonderful")
