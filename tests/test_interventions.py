"""Interventions checked against independent ways of making the same change."""

import copy

import pytest
import torch

from workbench.probes.interventions import (
    ablate_heads,
    edit_residual,
    scale_first_token_attention,
    sliding_window_mask,
    token_logprobs,
)

IDS = torch.tensor([[5, 60, 700, 8000, 90, 1000, 11, 12000, 13]])


def _logits(handle, **kwargs):
    with torch.no_grad():
        return handle.hf_model(input_ids=IDS, use_cache=False, **kwargs).logits


def test_zero_ablation_equals_zeroing_the_heads_w_o_columns(tiny):
    d_h = tiny.head_dim
    with ablate_heads(tiny, {1: [2]}, mode="zero"):
        hooked = _logits(tiny)
    edited = copy.deepcopy(tiny)
    with torch.no_grad():
        edited.hf_model.model.layers[1].self_attn.o_proj.weight[:, 2 * d_h : 3 * d_h] = 0
    torch.testing.assert_close(hooked, _logits(edited), rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(tiny), _logits(copy.deepcopy(tiny)))  # hooks are gone


def test_sink_ablation_of_all_heads_equals_attending_only_to_key_0(tiny):
    with ablate_heads(tiny, {0: list(range(tiny.n_heads))}, mode="sink"):
        hooked = _logits(tiny)

    def only_key_0(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        mask[..., 1:] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handle = tiny.hf_model.model.layers[0].self_attn.register_forward_pre_hook(only_key_0, with_kwargs=True)
    try:
        expected = _logits(tiny)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)


def test_scaling_first_token_attention_renormalises(tiny):
    with torch.no_grad():
        base = tiny.hf_model(input_ids=IDS, output_attentions=True).attentions[0]
    s = 3.0
    with scale_first_token_attention(tiny, [0], s), torch.no_grad():
        scaled = tiny.hf_model(input_ids=IDS, output_attentions=True).attentions[0]
    a0 = base[..., 1:, :1]
    expected = base[..., 1:, :] / (s * a0 + 1 - a0)
    expected[..., 0] *= s
    torch.testing.assert_close(scaled[..., 1:, :], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[..., 0, :], base[..., 0, :])  # query 0 sees only key 0
    with scale_first_token_attention(tiny, [0], 0.0), torch.no_grad():
        zeroed = tiny.hf_model(input_ids=IDS, output_attentions=True).attentions[0]
    assert float(zeroed[..., 1:, 0].abs().max()) < 1e-12


def test_edit_residual(tiny):
    with edit_residual(tiny, 0, lambda h: h):
        torch.testing.assert_close(_logits(tiny), _logits(copy.deepcopy(tiny)), rtol=0, atol=0)
    # zeroing the last layer's output: the final RMSNorm of 0 is 0, so every logit is 0
    with edit_residual(tiny, tiny.n_layers - 1, lambda h: h * 0):
        assert float(_logits(tiny).abs().max()) == 0.0


def test_sliding_window_mask_hand_built():
    allowed = sliding_window_mask(6, window=2, n_sink=1)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_window_as_long_as_the_text_is_full_attention(tiny):
    full = token_logprobs(tiny, IDS)
    windowed = token_logprobs(tiny, IDS, sliding_window_mask(IDS.shape[1], window=IDS.shape[1], n_sink=0))
    torch.testing.assert_close(full, windowed)


def test_out_of_range_layers_and_heads(tiny):
    with pytest.raises(IndexError, match="layers 0..1"):
        ablate_heads(tiny, {5: [0]})
    with pytest.raises(IndexError, match="heads 0..3"):
        ablate_heads(tiny, {0: [9]})
    with pytest.raises(IndexError, match="layers 0..1"):
        scale_first_token_attention(tiny, [2], 2.0)
    with pytest.raises(ValueError, match="'zero' or 'sink'"):
        ablate_heads(tiny, {0: [0]}, mode="mean")
