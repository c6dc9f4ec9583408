"""Under-trained tokens (Magikarp): categories against the tokenizers' own encode/decode on every token,
indicators on hand-built matrices with planted rows (and the PCA variant against scikit-learn),
verification on a tiny model trained here so that some tokens never occur, and on SmolLM2 against
Hugging Face's own probabilities."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from transformers import LlamaConfig, LlamaForCausalLM

import workbench as wb
from workbench.analyses.undertrained_tokens import (
    RepeatPrompt, candidates, classify, indicators_from_matrices, reference_tokens, repeat_prompts, token_categories,
    verify_tokens, weight_indicators,
)
from workbench.models import ModelHandle


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_categories_agree_with_the_tokenizers_own_round_trip(name):
    tok = wb.load_tokenizer(name)
    cats = token_categories(tok)
    ids = np.arange(len(tok))
    decoded = tok.batch_decode([[int(t)] for t in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    category = cats.category.values
    plain = [t for t in ids if category[t] in ("ok", "unreachable")]
    encoded = tok([decoded[t] for t in plain], add_special_tokens=False)["input_ids"]
    for t, e in zip(plain, encoded):
        assert (category[t] == "ok") == (list(e) == [int(t)]), (t, decoded[t], e)
    for t in ids[category == "partial_utf8"]:
        assert "\ufffd" in decoded[t]
    assert set(tok.all_special_ids) <= set(ids[category == "special"])
    if name == "gemma3-270m":
        assert (category == "byte_fallback").sum() == 256
        assert "<unused0>" in set(cats.piece.values[category == "special"])
    else:
        assert (category == "partial_utf8").sum() > 100  # byte-level BPE: fragments of multi-byte characters


def planted(seed=0, n=400, d=16, n_planted=12):
    """Trained-looking rows spread in every direction, and planted under-trained rows: a shared offset
    plus small noise (the state softmax gradients leave rows of tokens that never occur in)."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=(n, 1))
    offset = rng.normal(size=d)
    rows = rng.choice(n, n_planted, replace=False)
    U[rows] = offset + 0.05 * rng.normal(size=(n_planted, d))
    return U, np.sort(rows)


def test_indicators_find_planted_rows():
    U, rows = planted()
    reference = rows[:4]  # a few known-unused ones; the rest must be found
    ind = indicators_from_matrices(U, None, reference)
    for name in ("cosine", "centred_cosine", "pc_removed", "l2_distance"):
        lowest = np.argsort(ind[name].values)[: len(rows)]
        assert set(lowest) == set(rows), name
    # untied: the input embedding's norm; planted rows are tiny
    E = np.random.default_rng(1).normal(size=U.shape)
    E[rows] *= 0.01
    assert set(np.argsort(indicators_from_matrices(U, E, reference).embedding_norm.values)[: len(rows)]) == set(rows)
    # no reference: the reference-based indicators are NaN, the norm is still there
    empty = indicators_from_matrices(U, None, [])
    assert np.isnan(empty.cosine.values).all() and np.isfinite(empty.embedding_norm.values).all()


def test_pc_removed_matches_scikit_learn_pca():
    U, rows = planted(seed=3)
    U = U + 3.0  # a common offset, as real unembeddings have
    pc = PCA(n_components=1).fit(U).components_[0]
    removed = U - np.outer(U @ pc, pc)
    mean = removed[rows].mean(axis=0)
    expected = 1 - removed @ mean / (np.linalg.norm(removed, axis=1) * np.linalg.norm(mean))
    got = indicators_from_matrices(U, None, rows).pc_removed.values
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_classify_uses_the_papers_thresholds():
    assert [classify(p) for p in (0.95, 0.5, 0.05, 0.0005)] == [
        "strongly_rejected", "weakly_rejected", "weakly_verified", "strongly_verified"]


SEP, VOCAB, SEEN = 1, 48, 32  # tokens 2..31 occur in training; 32..47 never do


@pytest.fixture(scope="module")
def trained_copier():
    """A tiny untied Llama trained for a few seconds to copy two tokens after a separator ([BOS x y SEP x y]),
    on tokens 2..31 only: tokens 32..47 never occur, so their input rows are never trained and softmax
    pushes their output rows down. (Tied, the copy circuit would still echo an unseen token's own row.)"""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        x = torch.randint(2, SEEN, (64, 2), generator=gen)
        batch = torch.cat([torch.zeros(64, 1, dtype=torch.long), x, torch.full((64, 1), SEP), x], dim=1)
        labels = batch.clone()
        labels[:, :4] = -100  # learn the copy only
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return ModelHandle(name="trained-copier", hf_model=model, tokenizer=None, source="trained in the test", file_hash="copier")


def test_verification_on_a_model_with_tokens_it_never_saw(trained_copier):
    prompts = [RepeatPrompt("copy", (0, 5, None, SEP, 5)), RepeatPrompt("copy_first", (0, None, 7, SEP))]
    out = verify_tokens(trained_copier, np.arange(2, VOCAB), prompts, batch_size=10)
    assert out.attrs["forward_passes"] == 2 * 5  # 46 candidates in batches of 10, per prompt
    verdict = dict(zip(out.token.values, out.verdict.values))
    assert all(verdict[t] == "strongly_verified" for t in range(SEEN, VOCAB))
    assert all(verdict[t] == "strongly_rejected" for t in range(2, SEEN))
    # the indicators from the weights alone rank the never-seen tokens lowest, given three of them as reference
    W = trained_copier.hf_model.get_output_embeddings().weight.detach().numpy()
    E = trained_copier.hf_model.get_input_embeddings().weight.detach().numpy()
    ind = indicators_from_matrices(W, E, [SEEN, SEEN + 1, SEEN + 2])
    for name in ("cosine", "centred_cosine", "l2_distance", "embedding_norm"):  # (with 48 rows, the first PC is
        assert set(np.argsort(ind[name].values[2:])[: VOCAB - SEEN] + 2) == set(range(SEEN, VOCAB)), name  # the unseen direction)


def test_verification_probability_equals_hugging_face(smollm2):
    cats = token_categories(smollm2.tokenizer)
    ind = weight_indicators(smollm2, cats)
    assert ind.attrs["tied"] == 1 and ind.attrs["reference"] == "special tokens the tokenizer never inserts"
    cands = candidates(cats, ind[ind.attrs["primary"]], 0.02)
    assert len(cands) == round(0.02 * (cats.category.values == "ok").sum())
    common = smollm2.tokenizer.encode(" the of and", add_special_tokens=False)
    out = verify_tokens(smollm2, [*cands[:5], *common], batch_size=4)
    for prompt in repeat_prompts(smollm2):
        ids = torch.tensor([prompt.ids(cands[0])])
        with torch.no_grad():
            p = torch.softmax(smollm2.hf_model(input_ids=ids).logits[0, -1].float(), -1)[cands[0]]
        assert float(out.probability.sel(token=cands[0], prompt=prompt.name)) == pytest.approx(float(p), abs=1e-6)
    assert all(v == "strongly_verified" for v in out.verdict.values[:5])  # e.g. 'ManagementPlaneProtection'
    assert all(v == "strongly_rejected" for v in out.verdict.values[5:])


def test_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        candidates(None, None, 0)
    U, _ = planted()
    handle = wb.load_model("tiny-random-llama")
    with pytest.raises(ValueError, match="no candidate"):
        verify_tokens(handle, [])
    with pytest.raises(ValueError, match="candidate ids must be in"):
        verify_tokens(handle, [10**9])
    cats = token_categories(handle.tokenizer)
    assert reference_tokens(cats)[1] == "none"  # without the tokenizer, SmolLM2's vocabulary names no unused token


def test_model_without_exposed_input_embedding(monkeypatch):
    """An untied model whose input embedding the site map cannot reach: the unembedding indicators still
    come out, embedding_norm is NaN, and the primary indicator says so."""
    from workbench.probes.sites import SiteMap, UnsupportedSiteError

    handle = wb.load_model("tiny-random-gpt_neox")  # untied
    def missing(self):
        raise UnsupportedSiteError("gpt_neox: the adapter names no input embedding with a weight matrix")
    monkeypatch.setattr(SiteMap, "W_E", missing)
    ind = weight_indicators(handle, token_categories(handle.tokenizer))
    assert ind.attrs["primary"] == "cosine" and "not exposed" in ind.attrs["embedding"]
    assert np.isnan(ind.embedding_norm.values).all() and np.isfinite(ind.cosine.values).all()
    with pytest.raises(ValueError, match="pass reference="):
        weight_indicators(handle, token_categories(handle.tokenizer), reference=[])
