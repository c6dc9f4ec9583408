"""Probe reductions on hand-built inputs with known answers."""

import math

import pytest
import torch

from workbench.probes import PROBES, UnknownProbeError, resolve_probes
from workbench.probes.catalog import attention_received, logit_summaries, value_norms, w_o_factor


def test_attention_received_hand_built():
    # one head, 3 tokens, all valid; rows are queries
    a = torch.tensor([[[[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.6, 0.1, 0.3]]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    got = attention_received(a, valid)[0, 0]
    # key 0: later queries 1, 2 -> (0.8 + 0.6) / 2; key 1: query 2 -> 0.1; key 2: no later query
    assert got[0].item() == pytest.approx(0.7)
    assert got[1].item() == pytest.approx(0.1)
    assert math.isnan(got[2].item())


def test_attention_received_ignores_padding_queries():
    a = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]]])
    valid = torch.tensor([[True, True, False]])  # the third query is padding
    got = attention_received(a, valid)[0, 0]
    assert got[0].item() == pytest.approx(0.5)
    assert math.isnan(got[1].item())


def test_value_norms_identity_projection():
    # 2 heads sharing 1 kv head (GQA); W_O^h = identity on head h's slice -> norm of v itself
    v = torch.tensor([[[[3.0, 4.0]], [[0.0, 1.0]]]])  # (b=1, p=2, kv=1, d_h=2)
    w_o = torch.eye(4)  # d_model = 4 = 2 heads x 2
    per_head = w_o.reshape(4, 2, 2)  # (d_model, head, d_h)
    got = value_norms(v, w_o_factor(per_head.permute(1, 2, 0)), n_heads=2)
    assert got.shape == (1, 2, 2)
    assert got[0, :, 0].tolist() == pytest.approx([5.0, 5.0])
    assert got[0, :, 1].tolist() == pytest.approx([1.0, 1.0])


def test_value_norms_match_direct_product_with_gqa():
    torch.manual_seed(0)
    b, p, kv, n_heads, d_h, d = 2, 5, 2, 6, 4, 10
    v = torch.randn(b, p, kv, d_h)
    w_o = torch.randn(d, n_heads * d_h)
    per_head = w_o.reshape(d, n_heads, d_h)
    w_o[:, :d_h] = 0  # head 0 writes nothing (rank 0): the factor must still exist
    got = value_norms(v, w_o_factor(per_head.permute(1, 2, 0)), n_heads)
    for h in range(n_heads):
        direct = (v[:, :, h // (n_heads // kv)] @ per_head[:, h].T).norm(dim=-1)  # (b, p)
        torch.testing.assert_close(got[:, h], direct, rtol=1e-5, atol=1e-5)


def test_logit_summaries_uniform_and_peaked():
    vocab = 8
    logits = torch.zeros(1, 2, vocab)
    logits[0, 1, 3] = 100.0  # position 1 is certain of token 3
    ids = torch.tensor([[5, 2]])
    out = logit_summaries(logits, ids, top_k=2)
    assert out["entropy"][0, 0].item() == pytest.approx(math.log(vocab))
    assert out["entropy"][0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert out["next_token_logprob"][0, 0].item() == pytest.approx(-math.log(vocab))  # next token 2, uniform
    assert math.isnan(out["next_token_logprob"][0, 1].item())
    assert out["top_k_ids"][0, 1, 0].item() == 3


def test_unknown_probe_lists_valid_ones():
    with pytest.raises(UnknownProbeError) as err:
        resolve_probes(["resid_pre", "attention_sink"])
    assert "attention_sink" in str(err.value)
    for name in PROBES:
        assert name in str(err.value)


def test_empty_probe_list_is_an_error():
    with pytest.raises(UnknownProbeError, match="No probes"):
        resolve_probes([])


def test_logit_summaries_mask_the_token_before_padding():
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[1, 2, 0]])
    valid = torch.tensor([[True, True, False]])
    nxt = logit_summaries(logits, ids, top_k=1, valid=valid)["next_token_logprob"][0]
    assert nxt[0].item() == pytest.approx(-math.log(4))
    assert math.isnan(nxt[1].item()) and math.isnan(nxt[2].item())


def test_attention_received_from_lengths_equals_the_masked_product():
    """Right-padded batches: the per-sample sums over valid query rows (what capture uses, lengths known on
    the host) give the masked product's numbers, with padding rows full of attention that must not count."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 2, 6, 6), -1)  # padding query rows hold non-zero weights
    lengths = [6, 4, 1]
    valid = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    a = a.tril() * valid[:, None, None, :]  # causal, no attention onto padding keys
    want = attention_received(a, valid)
    got = attention_received(a, valid, lengths)
    assert torch.allclose(got, want, equal_nan=True, atol=1e-6)
    assert torch.isnan(got[2]).all()  # a one-token sample: no key has a later query
    full = attention_received(a[:1], valid[:1], [6])
    assert torch.allclose(full, want[:1], equal_nan=True, atol=1e-6)
    # by hand: key 0 of sample 1 (length 4) receives the mean of rows 1..3 at column 0
    assert got[1, 0, 0].item() == pytest.approx(a[1, 0, 1:4, 0].mean().item(), abs=1e-6)
