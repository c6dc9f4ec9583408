"""Tokenizer fairness: counts and premiums on hand-built tokenizers with known answers; the loss per
byte against Hugging Face's own loss; the bundled parallel text; bad input."""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import workbench as wb
from workbench.analyses.tokenizer_fairness import fairness_table, loss_per_byte, parallel_counts, worst_pairs
from workbench.corpus import parallel_corpus, parallel_languages


def word_tokenizer(words):
    """One token per whitespace-separated word (a hand-built tokenizer whose counts are known)."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def char_tokenizer(chars):
    """One token per character."""
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


CORPUS = {"eng": ["a b", "a b c d"], "xyz": ["a b c d", "a b c é"]}


def test_counts_and_premium_known_answers():
    counts = parallel_counts({"words": word_tokenizer("abcdé"), "chars": char_tokenizer("abcdé ")}, CORPUS)
    assert counts.tokens.sel(tokenizer="words").values.tolist() == [[2, 4], [4, 4]]
    assert counts.tokens.sel(tokenizer="chars").values.tolist() == [[3, 7], [7, 7]]
    assert counts.bytes.values.tolist() == [[3, 7], [7, 8]]  # é is two UTF-8 bytes
    assert counts.characters.values.tolist() == [[3, 7], [7, 7]]
    table = fairness_table(counts)
    words = table.sel(tokenizer="words")
    assert float(words.premium.sel(language="xyz")) == pytest.approx(8 / 6)  # ratio of totals (the paper's)
    assert float(words.premium_unit_mean.sel(language="xyz")) == pytest.approx((4 / 2 + 4 / 4) / 2)
    assert float(words.premium.sel(language="eng")) == 1.0
    assert float(words.tokens_per_unit.sel(language="xyz")) == 4.0
    assert float(words.bytes_per_token.sel(language="xyz")) == pytest.approx(15 / 8)
    chars = table.sel(tokenizer="chars")
    assert float(chars.characters_per_token.sel(language="xyz")) == 1.0
    assert float(table.bytes_premium.sel(language="xyz")) == pytest.approx(15 / 10)
    top = worst_pairs(table, 1)[0]
    assert (top["tokenizer"], top["language"]) == ("chars", "xyz")  # 14 / 10 = 1.4 > 8 / 6


def test_bad_input_says_what_is_missing():
    tok = {"words": word_tokenizer("ab")}
    with pytest.raises(ValueError, match="same number"):
        parallel_counts(tok, {"eng": ["a"], "xyz": ["a", "b"]})
    with pytest.raises(ValueError, match="empty"):
        parallel_counts(tok, {"eng": ["a"], "xyz": [""]})
    with pytest.raises(ValueError, match="no tokenizers"):
        parallel_counts({}, {"eng": ["a"]})
    with pytest.raises(ValueError, match="reference language 'eng'"):
        fairness_table(parallel_counts(tok, {"xyz": ["a"]}))
    with pytest.raises(ValueError, match="no parallel text for 'klingon'.*eng"):
        parallel_corpus(["eng", "klingon"])
    with pytest.raises(wb.ModelNotAvailableError, match="Unknown tokenizer"):
        wb.load_tokenizer("no-such-tokenizer")


def test_bundled_parallel_text_is_parallel_and_wide():
    corpus = parallel_corpus()
    assert next(iter(corpus)) == "eng"
    assert len(corpus) >= 30 and len({script for _, _, script in parallel_languages()}) >= 8
    assert all(len(r["articles"]) == 30 and all(a.strip() for a in r["articles"]) for r in corpus.values())
    # Article 3 is one sentence about life, liberty and security everywhere: lengths stay within a factor of 4 in bytes
    eng = len(corpus["eng"]["articles"][2].encode())
    assert all(0.25 < len(r["articles"][2].encode()) / eng < 4 for r in corpus.values())


def test_embedded_tokenizers_premiums(smollm2):
    """SmolLM2's English-centric BPE: Latin-script languages cost 2-3x, Indic and Burmese over 10x
    (Petrov et al. report up to ~15x for GPT-2-like tokenizers); counts equal the tokenizer's own encodings."""
    corpus = {c: r["articles"] for c, r in parallel_corpus(["eng", "fra", "rus", "mya"]).items()}
    counts = parallel_counts({"smollm2-135m": wb.load_tokenizer("smollm2-135m")}, corpus)
    direct = len(smollm2.tokenizer.encode(corpus["rus"][4], add_special_tokens=False))
    assert int(counts.tokens.sel(tokenizer="smollm2-135m", language="rus", unit=4)) == direct
    premium = fairness_table(counts).premium.sel(tokenizer="smollm2-135m")
    assert 1.5 < float(premium.sel(language="fra")) < 3 < float(premium.sel(language="rus")) < 10 < float(premium.sel(language="mya"))


def hf_total_nll(handle, start, text):
    ids = torch.tensor([start + handle.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        labels = ids.clone()
        labels[0, : len(start)] = -100
        loss = handle.hf_model(input_ids=ids, labels=labels).loss
    return float(loss) * (ids.shape[1] - len(start))


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_loss_per_byte_equals_hugging_face_loss(name, request):
    handle = request.getfixturevalue(name)
    texts = [r["articles"][0][:60 if name == "tiny" else None] for r in parallel_corpus(["eng", "rus", "jpn", "tha"]).values()]
    out = loss_per_byte(handle, texts, max_batch_tokens=300)  # several batches, padded rows
    for i, text in enumerate(texts):
        expected = hf_total_nll(handle, out.attrs["start_tokens"], text)
        assert float(out.nats[i]) == pytest.approx(expected, rel=1e-4)
        assert float(out.bits_per_byte[i]) == pytest.approx(expected / math.log(2) / len(text.encode()), rel=1e-4)
    assert np.all(out.tokens.values > 0)
