"""Capture: batching, padding, reductions vs full tensors, labels, bad input."""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.capturing import InputTooLongError

from .conftest import PROSE, hf_forward


def test_batched_equals_one_by_one(smollm2):
    probes = ["resid_pre", "attn_received", "value_norm", "logits"]
    batched = wb.capture(smollm2, PROSE, probes, batch_size=4, progress=False)
    single = wb.capture(smollm2, PROSE, probes, batch_size=1, progress=False)
    for name in ("resid_pre", "attn_received", "value_norm", "next_token_logprob", "entropy", "top_k_logprobs"):
        a, b = batched[name].values, single[name].values
        assert np.array_equal(np.isnan(a), np.isnan(b)), name  # padding in the same places
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_padding_never_leaks(tiny):
    run = wb.capture(tiny, ["a much longer first text with many tokens in it", "short"], progress=False)
    n = int(run.n_tokens[1])
    short = run.isel(sample=1)
    assert not short.valid.values[n:].any()
    assert np.isnan(short.resid_pre.values[n:]).all()
    assert np.isnan(short.attn_received.values[..., n:]).all()
    assert np.isnan(short.value_norm.values[..., n:]).all()
    assert (short.top_k_ids.values[n:] == -1).all()
    assert (short.token_id.values[n:] == -1).all()
    assert np.isfinite(short.resid_pre.values[:n]).all()


def test_attention_received_equals_reduction_of_full_pattern(smollm2):
    run = wb.capture(smollm2, PROSE, ["attn_pattern", "attn_received"], progress=False)
    pattern = run.attn_pattern  # (sample, layer, head, pos, key_pos)
    n = run.sizes["pos"]
    later = np.tril(np.ones((n, n), dtype=bool), -1)  # query > key
    mask = later[None] & run.valid.values[:, :, None]  # (sample, q, k)
    with np.errstate(invalid="ignore"):  # 0/0 where no later query: NaN, as in the run
        values = np.where(mask[:, None, None], np.nan_to_num(pattern.values), 0.0).sum(3) / mask.sum(1)[:, None, None]
    values = np.where(run.valid.values[:, None, None, :], values, np.nan)
    np.testing.assert_allclose(run.attn_received.values, values, rtol=1e-5, atol=1e-7)


def test_value_norm_matches_direct_computation_from_hf(smollm2):
    """||W_O^h v_j|| recomputed from HF hidden states and weights, with no Gram trick."""
    text = PROSE[0]
    run = wb.capture(smollm2, text, ["value_norm"], progress=False)
    out, ids, _ = hf_forward(smollm2, [text])
    group = smollm2.n_heads // smollm2.n_kv_heads
    for layer in (0, 7, 29):
        block = smollm2.hf_model.model.layers[layer]
        with torch.no_grad():
            v = block.self_attn.v_proj(block.input_layernorm(out.hidden_states[layer]))[0]  # (p, kv*d_h)
            v = v.view(v.shape[0], smollm2.n_kv_heads, smollm2.head_dim)
            w_o = block.self_attn.o_proj.weight.view(smollm2.d_model, smollm2.n_heads, smollm2.head_dim)
            direct = torch.stack([(v[:, h // group] @ w_o[:, h].T).norm(dim=-1) for h in range(smollm2.n_heads)])
        np.testing.assert_allclose(run.value_norm.sel(layer=layer).values[0], direct.numpy(), rtol=2e-4, atol=1e-4)


def test_labels_and_byte_offsets(smollm2):
    text = "Élan vital — naïve café, 🙂 ok"
    run = wb.capture(smollm2, text, ["logits"], progress=False)
    data = text.encode()
    one = run.isel(sample=0)
    starts, ends = one.byte_start.values, one.byte_end.values
    assert starts[0] == 0 and ends[-1] == len(data)
    assert (np.diff(starts) >= 0).all() and (ends >= starts).all()
    covered = np.zeros(len(data), dtype=bool)
    for s, e in zip(starts, ends):
        covered[s:e] = True
    assert covered.all()  # every byte of the text belongs to a token
    # a token boundary never falls inside a UTF-8 character unless the token itself is a partial character
    for s, e, tok in zip(starts, ends, one.token.values):
        if "\ufffd" not in str(tok):
            assert data[s:e].decode("utf-8").strip() == str(tok).strip()
    assert str(one.text.values) == text
    assert one.token.values[1] == smollm2.tokenizer.decode([int(one.token_id.values[1])])


def test_ascii_tokens_decode_to_their_byte_span(smollm2):
    text = "The quick brown fox jumps over the lazy dog."
    one = wb.capture(smollm2, text, ["logits"], progress=False).isel(sample=0)
    spans = [text.encode()[s:e].decode() for s, e in zip(one.byte_start.values, one.byte_end.values)]
    assert spans == [str(t) for t in one.token.values]


def test_provenance_attrs(tiny):
    run = wb.capture(tiny, "hello world", ["resid_pre"], progress=False)
    attrs = run.attrs
    assert attrs["model"] == "tiny-random-llama" and attrs["backend"] == "torch"
    assert attrs["dtype"] == "float32" and attrs["device"] == "cpu" and attrs["attn_implementation"] == "eager"
    assert attrs["probes"] == "resid_pre" and "torch" in attrs["package_versions"]


@pytest.mark.parametrize(
    "texts, error, message",
    [
        ([], ValueError, "No texts"),
        ("", ValueError, "empty"),
        (["fine", "   "], ValueError, r"\[1\]"),
        ([3], TypeError, "strings"),
        (["fine", [1, 2]], TypeError, "strings"),
        ([[1, 2], []], TypeError, "non-empty lists of token ids"),
        ([[1, 10**9]], ValueError, "out of range"),
    ],
)
def test_bad_texts(tiny, texts, error, message):
    with pytest.raises(error, match=message):
        wb.capture(tiny, texts, progress=False)


def test_pre_tokenised_input_runs_exactly_those_tokens(tiny):
    """Token-id lists (e.g. shuffled prompts) are run as given and equal the same tokens from text."""
    text = "The cat sat on the mat."
    ids = tiny.tokenizer(text)["input_ids"]
    from_text = wb.capture(tiny, text, ["resid_pre", "logits"], progress=False)
    from_ids = wb.capture(tiny, [torch.tensor(ids), ids[::-1]], ["resid_pre", "logits"], progress=False)
    np.testing.assert_array_equal(from_ids.token_id.values[0], ids)
    np.testing.assert_array_equal(from_ids.token_id.values[1], ids[::-1])
    # the same tokens in a batch of one and of two: equal up to float32 rounding (with two threads MKL splits a
    # 7-row and a 14-row product differently; bit-equal only where one thread runs both)
    np.testing.assert_allclose(from_ids.resid_pre.isel(sample=0), from_text.resid_pre.isel(sample=0), rtol=1e-5,
                               atol=1e-6)
    text0 = str(from_ids.text.values[0])
    spans = zip(from_ids.byte_start.values[0], from_ids.byte_end.values[0])
    assert [text0.encode()[a:b].decode() for a, b in spans] == list(from_ids.token.values[0])


def test_unknown_probe_and_backend(tiny):
    with pytest.raises(wb.UnknownProbeError, match="Valid probes"):
        wb.capture(tiny, "hi", ["resid"], progress=False)
    with pytest.raises(ValueError, match="nnsight"):
        wb.capture(tiny, "hi", backend="pytorch", progress=False)


def test_too_long_is_an_error_unless_truncating(tiny):
    text = "word " * 50
    with pytest.raises(InputTooLongError, match="truncate=True"):
        wb.capture(tiny, text, ["resid_pre"], max_tokens=10, progress=False)
    with pytest.warns(UserWarning, match="dropping"):
        run = wb.capture(tiny, [text, "short"], ["resid_pre"], max_tokens=10, truncate=True, progress=False)
    assert int(run.n_tokens[0]) == 10 and run.attrs["truncated_samples"] == "0"
    assert str(run.text.values[0]) == text.encode()[: int(run.byte_end.values[0, 9])].decode()


def test_longer_than_model_context_is_caught(tiny):
    with pytest.raises(InputTooLongError, match="256 tokens"):
        wb.capture(tiny, "word " * 400, ["resid_pre"], progress=False)


def test_value_norms_follow_weight_edits_between_captures():
    """W_O's factor is cached on the handle across captures; an in-place edit must not be served stale."""
    handle = wb.load_model("tiny-random-llama")
    before = wb.capture(handle, ["The cat sat on the mat."], ["value_norm"], progress=False).value_norm
    o_proj = handle.hf_model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.mul_(2.0)
    after = wb.capture(handle, ["The cat sat on the mat."], ["value_norm"], progress=False).value_norm
    # layer 0's values depend on the embeddings alone, so only its W_O changed: its norms double
    np.testing.assert_allclose(after.sel(layer=0), 2 * before.sel(layer=0), rtol=1e-5)


def test_layers_gathered_per_batch_store_what_per_layer_stores_do(tiny, monkeypatch):
    """Small per-layer values are gathered into one array per variable and batch (stored at the batch's end);
    forcing every value through the per-layer path instead, or only the residuals, stores the same numbers
    in the same places, with padding and shared residuals. (On a GPU, where values wait on the device and
    large ones flush mid-batch, tests/test_gpu.py compares the same settings against the CPU.)"""
    import workbench.capturing as capture_module
    from workbench.probes.collector import BatchCollector

    probes = ["resid_pre", "resid_post", "resid_norm", "attn_received", "value_norm", "logits", "attn_out"]
    texts = [PROSE[0], PROSE[1][:30], PROSE[2][:70]]
    gathered = wb.capture(tiny, texts, probes, batch_size=2, progress=False)

    def collector(**settings):
        class Collector(BatchCollector):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, **settings})

        return Collector

    # every value per layer; then norms and attention gathered, residuals per layer
    for settings in ({"stack_bytes": 0, "defer_bytes": 1}, {"stack_bytes": 4096, "defer_bytes": 1}):
        monkeypatch.setattr(capture_module, "BatchCollector", collector(**settings))
        other = wb.capture(tiny, texts, probes, batch_size=2, progress=False)
        for name in gathered.data_vars:
            np.testing.assert_array_equal(gathered[name].values, other[name].values, err_msg=f"{name} {settings}")
