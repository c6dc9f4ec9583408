"""Captures equal Hugging Face's own outputs exactly (CPU float32), for both backends and both embedded models.

HF's hidden_states[l] is the residual entering layer l; its last entry is the final-norm
output; attentions[l] are the eager attention probabilities. Each backend runs the same
right-padded batch HF runs here, so every valid entry must match bit for bit.
"""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.probes.catalog import logit_summaries

from .conftest import PROSE, hf_forward

ALL_PROBES = ["resid_pre", "resid_post", "final_norm", "attn_pattern", "attn_received", "value_norm", "logits",
              "attn_out", "mlp_out"]


def _check_exact_parity(handle, backend, texts):
    run = wb.capture(handle, texts, ALL_PROBES, backend=backend, batch_size=len(texts), progress=False)
    # capture sorts by length before batching; HF gets the same order
    order = sorted(range(len(texts)), key=lambda i: -len(handle.tokenizer(texts[i])["input_ids"]))
    out, ids, mask = hf_forward(handle, [texts[i] for i in order])
    n_layers = handle.n_layers
    for row, i in enumerate(order):
        n = int(run.n_tokens[i])
        sample = run.isel(sample=i, pos=slice(0, n))
        assert sample.token_id.values.tolist() == ids[row, :n].tolist()
        for layer in range(n_layers):
            np.testing.assert_array_equal(sample.resid_pre.sel(layer=layer).values, out.hidden_states[layer][row, :n])
            np.testing.assert_array_equal(
                sample.attn_pattern.sel(layer=layer).isel(key_pos=slice(0, n)).values, out.attentions[layer][row, :, :n, :n]
            )
            if layer < n_layers - 1:
                np.testing.assert_array_equal(sample.resid_post.sel(layer=layer).values, out.hidden_states[layer + 1][row, :n])
        np.testing.assert_array_equal(sample.final_norm.values, out.hidden_states[n_layers][row, :n])
        # logit summaries: the same reduction applied to HF's own logits
        expected = logit_summaries(out.logits[row : row + 1, :n], ids[row : row + 1, :n], run.attrs["top_k"])
        assert np.isnan(sample.next_token_logprob.values[-1])
        for name in ("next_token_logprob", "entropy", "top_k_logprobs", "top_k_ids"):
            np.testing.assert_array_equal(sample[name].values, expected[name][0].numpy())
        # independent check of the log-prob: log softmax of HF logits at the true next token
        lp = torch.log_softmax(out.logits[row, : n - 1], -1).gather(-1, ids[row, 1:n, None])[:, 0]
        np.testing.assert_allclose(sample.next_token_logprob.values[:-1], lp.numpy(), rtol=1e-6)
    return run


@pytest.mark.real
@pytest.mark.parametrize("backend", ["torch", "nnsight", "transformer_lens"])
def test_smollm2_parity_with_hugging_face(smollm2, backend):
    run = _check_exact_parity(smollm2, backend, PROSE)
    assert run.attrs["backend"] == backend
    # the sublayer updates add up to the next residual
    np.testing.assert_allclose((run.resid_pre + run.attn_out + run.mlp_out).values, run.resid_post.values,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("backend", ["torch", "nnsight", "transformer_lens"])
def test_gemma3_parity_with_hugging_face(gemma3, backend):
    run = _check_exact_parity(gemma3, backend, PROSE[:2])
    # Gemma 3's sandwich norms: the update is the post-norm output, still summing to resid_post
    np.testing.assert_allclose((run.resid_pre + run.attn_out + run.mlp_out).values, run.resid_post.values,
                               rtol=1e-5, atol=1e-3)


@pytest.mark.real
def test_backends_agree_exactly(smollm2):
    probes = ["resid_pre", "attn_received", "value_norm", "logits"]
    a = wb.capture(smollm2, PROSE, probes, backend="torch", progress=False)
    for other in ("nnsight", "transformer_lens"):
        b = wb.capture(smollm2, PROSE, probes, backend=other, progress=False)
        for name in a.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{other} {name}")
