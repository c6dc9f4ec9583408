"""KV-cache redundancy ("The Residual Stream Is All You Need"): K/V recomputed from the residual,
full-residual patching, and the residual vs KV-cache memory calculator."""

from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, Gemma3Config, Gemma3TextConfig, GPT2Config, LlamaConfig

import workbench as wb
from workbench.analyses.residual_redundancy import cache_memory, kv_recompute_error, residual_patch_kl
from workbench.probes import hooks
from workbench.probes.sites import K

torch.set_num_threads(1)

TEXT_A = "The cat sat on the mat and looked out of the window at the rain."
TEXT_B = "Attention sinks appear on the first token of almost every prompt today."
TINY = ["gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode", "llama", "mistral", "qwen2",
        "phi", "gemma2", "gemma3_text", "olmo2", "cohere"]


def pair(handle, n=12):
    ids = [handle.tokenizer(t, return_tensors="pt").input_ids[:, :n] for t in (TEXT_A, TEXT_B)]
    assert ids[0].shape == ids[1].shape == (1, n)
    return ids


# ---------------------------------------------------------------- memory calculator


def test_cache_memory_hand_built_config():
    # 2 (K, V) * 6 layers * 2 kv heads * (96 / 4 = 24 head_dim) * 4 bytes = 2304; residual 96 * 4 = 384
    config = LlamaConfig(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100)
    m = cache_memory(config, dtype_bytes=4)
    assert (m["d_model"], m["n_layers"], m["n_kv_heads"], m["head_dim"]) == (96, 6, 2, 24)
    assert m["kv_bytes_per_token"] == 2 * 6 * 2 * 24 * 4 == 2304
    assert m["residual_bytes_per_token"] == 96 * 4 == 384
    assert m["residual_all_layers_bytes_per_token"] == 6 * 384
    assert m["kv_to_residual_ratio"] == 6.0
    # the same numbers from a plain dict; GPT-2 (no KV-head field, no head_dim): kv heads = heads, d / heads
    assert cache_memory(dict(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
                        4)["kv_bytes_per_token"] == 2304
    g = cache_memory(GPT2Config(n_embd=64, n_layer=3, n_head=8))
    assert (g["n_kv_heads"], g["head_dim"], g["kv_bytes_per_token"]) == (8, 8, 2 * 3 * 8 * 8 * 2)
    # multi-query Falcon: one KV head
    f = cache_memory(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                                  new_decoder_architecture=False))
    assert (f["n_kv_heads"], f["kv_bytes_per_token"]) == (1, 2 * 2 * 1 * 16 * 2)


def test_cache_memory_gemma3_4b_published_config():
    text = Gemma3TextConfig(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256, sliding_window=1024)
    for config in (text, Gemma3Config(text_config=text.to_dict())):  # the multimodal wrapper nests text_config
        m = cache_memory(config, dtype_bytes=2)  # bf16
        assert m["residual_bytes_per_token"] == 2560 * 2 == 5 * 1024
        assert m["kv_bytes_per_token"] == 2 * 34 * 4 * 256 * 2 == 136 * 1024
        assert m["kv_to_residual_ratio"] == pytest.approx(27.2)
        assert m["residual_all_layers_bytes_per_token"] == 34 * 5 * 1024
        assert m["sliding_window"] == 1024 and m["n_sliding_layers"] > 0  # noted, still counted in full


def test_cache_memory_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        cache_memory({"num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="dtype_bytes"):
        cache_memory(LlamaConfig(), dtype_bytes=0)


# ---------------------------------------------------------------- tiny architectures


@pytest.mark.parametrize("arch", TINY)
def test_tiny_architectures_kv_from_residual_and_full_patch(arch):
    handle = wb.load_model(f"tiny-random-{arch}")
    a, b = pair(handle)
    err = kv_recompute_error(handle, a, b)
    # float32 on CPU: the same kernels on the same inputs, so the recomputation is bit-exact
    assert (err["key_max_abs_diff"] == 0).all() and (err["value_max_abs_diff"] == 0).all(), err
    assert (err["key_max_abs_diff_unpatched"] > 0).all()  # the control: B's own keys differ
    kl = residual_patch_kl(handle, a, b)
    assert (kl["kl_full"] == 0).all(), kl
    # the last position alone is not enough: its query still reads B's keys/values (layer 0: B's prefix)
    assert (kl["kl_last_position"] > 0).all(), kl
    assert float(kl["kl_unpatched_last_position"]) > 0


def test_last_position_patch_is_exact_when_prefixes_agree(tiny):
    a, _ = pair(tiny)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % tiny.vocab_size  # same prefix, different last token
    kl = residual_patch_kl(tiny, a, b)
    assert (kl["kl_full"] == 0).all() and (kl["kl_last_position"] == 0).all()
    assert float(kl["kl_unpatched_last_position"]) > 0


def test_errors_before_any_work(tiny):
    a, b = pair(tiny)
    with pytest.raises(IndexError, match=r"0\.\.1"):
        kv_recompute_error(tiny, a, b, layers=[2])
    with pytest.raises(IndexError, match=r"0\.\.1"):
        residual_patch_kl(tiny, a, b, layers=[-1])
    with pytest.raises(ValueError, match="same"):
        kv_recompute_error(tiny, a, b[:, :-1])
    with pytest.raises(ValueError, match="identical"):
        residual_patch_kl(tiny, a, a)


# ---------------------------------------------------------------- a real model


def test_smollm2_kv_redundancy_and_hf_keys(smollm2):
    layers = [0, 14, smollm2.n_layers - 1]
    a, b = pair(smollm2)
    err = kv_recompute_error(smollm2, a, b, layers=layers)
    assert list(err["layer"].values) == layers
    assert (err["key_max_abs_diff"] == 0).all() and (err["value_max_abs_diff"] == 0).all(), err
    assert (err["key_max_abs_diff_unpatched"] > 1).all()
    kl = residual_patch_kl(smollm2, a, b, layers=layers)
    assert (kl["kl_full"] == 0).all(), kl
    assert (kl["kl_last_position"] > 1e-4).all(), kl
    assert float(kl["kl_last_position"][0]) > 1.0  # an early layer: the prefix decides much of the output

    # independent check against Hugging Face: K = k_proj(input_layernorm(hidden_states[l]))
    keys = {}
    hooks.forward(smollm2, a, reads=[(K, l) for l in layers], on_site=lambda s, l, t: keys.__setitem__(l, t.clone()),
                  logits=False)
    with torch.no_grad():
        hidden = smollm2.hf_model(input_ids=a, output_hidden_states=True, use_cache=False).hidden_states
        for l in layers:
            block = smollm2.hf_model.model.layers[l]
            k = block.self_attn.k_proj(block.input_layernorm(hidden[l]))
            k = k.view(1, a.shape[1], smollm2.n_kv_heads, smollm2.head_dim)
            assert keys[l].shape == k.shape
            assert float((keys[l] - k).abs().max()) == 0.0
