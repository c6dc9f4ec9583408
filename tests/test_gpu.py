"""On a CUDA device, in float32 and bfloat16, the workbench gives the numbers it gives on the CPU.

Skipped without CUDA (CI has none); run on a lent GPU machine by ``benchmarks/gpu_check.sh``,
with the results in ``benchmarks/RESULTS.md``. References are independent of the workbench's
own code paths: the same tiny model's CPU capture (float32), and Hugging Face's own
``output_hidden_states`` / ``output_attentions`` on the GPU in the model's dtype (bfloat16).
"""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.analyses.byte_level import ByteLevelModel
from workbench.probes.interventions import ablate_heads, token_logprobs

from .conftest import PROSE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL_PROBES = ["resid_pre", "resid_post", "resid_norm", "final_norm", "attn_pattern", "attn_received", "value_norm",
              "logits", "attn_out", "mlp_out"]
ARCHITECTURES = ["llama", "gpt2", "gpt_neox", "bloom", "falcon", "qwen2", "mixtral", "gemma2", "gemma3_text", "olmo2"]
TEXTS = PROSE[:3]


def _worst(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN in different places"
    return float(np.nanmax(np.abs(a - b))) if a.size else 0.0


def _hf_forward(handle, texts):
    enc = [handle.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    pad = handle.tokenizer.pad_token_id or 0
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=handle.device)
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=handle.device)
    with torch.no_grad():
        out = handle.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                              use_cache=False)
    return out, enc


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_on_cuda_equals_cpu(arch):
    cpu = wb.load_model(f"tiny-random-{arch}")
    gpu = wb.load_model(f"tiny-random-{arch}", device="cuda")
    a = wb.capture(cpu, TEXTS, ALL_PROBES, progress=False)
    b = wb.capture(gpu, TEXTS, ALL_PROBES, progress=False)
    assert b.attrs["device"].startswith("cuda") and a.attrs["device"] == "cpu"
    worst = {name: _worst(a[name], b[name]) for name in a.data_vars if name != "top_k_ids"}
    assert max(worst.values()) <= 1e-4, f"{arch}: {worst}"


def test_capture_on_cuda_with_every_storing_path_equals_cpu(monkeypatch):
    """Values gathered per batch on the device, values flushed to the host mid-batch (here after every one)
    while others are still being gathered, and every value per layer: all store the CPU capture's numbers."""
    import workbench.capturing as capture_module
    from workbench.probes.collector import BatchCollector
    probes = ["resid_pre", "resid_post", "resid_norm", "attn_received", "value_norm", "logits", "attn_out"]
    texts = [PROSE[0], PROSE[1][:30], PROSE[2][:70]]
    ref = wb.capture(wb.load_model("tiny-random-llama"), texts, probes, batch_size=2, progress=False)
    gpu = wb.load_model("tiny-random-llama", device="cuda")
    for settings in ({}, {"stack_bytes": 4096, "defer_bytes": 1}, {"stack_bytes": 0, "defer_bytes": 1}):
        class Collector(BatchCollector):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, **settings})

        monkeypatch.setattr(capture_module, "BatchCollector", Collector)
        run = wb.capture(gpu, texts, probes, batch_size=2, progress=False)
        worst = {name: _worst(ref[name], run[name]) for name in ref.data_vars if name != "top_k_ids"}
        assert max(worst.values()) <= 1e-4, (settings, worst)


def test_bfloat16_capture_on_cuda_equals_hugging_face():
    handle = wb.load_model("tiny-random-llama", device="cuda", dtype="bfloat16")
    run = wb.capture(handle, TEXTS, ["resid_pre", "resid_post", "final_norm", "attn_pattern"], progress=False)
    assert run.attrs["dtype"] == "bfloat16"
    out, enc = _hf_forward(handle, TEXTS)
    # capture sorts by length (longest first); samples keep the caller's order
    for i, ids in enumerate(enc):
        n = len(ids)
        s = run.isel(sample=i, pos=slice(0, n))
        for layer in range(handle.n_layers):
            assert _worst(s.resid_pre.sel(layer=layer), out.hidden_states[layer][i, :n].float().cpu()) == 0.0
            got = s.attn_pattern.sel(layer=layer).isel(key_pos=slice(0, n))
            assert _worst(got, out.attentions[layer][i, :, :n, :n].float().cpu()) == 0.0
        assert _worst(s.final_norm, out.hidden_states[-1][i, :n].float().cpu()) == 0.0


def test_bfloat16_attention_received_equals_hugging_face_patterns():
    """attn_received in bfloat16 (sums kept in float32) against HF's own bfloat16 attention probabilities,
    reduced in float64 here: mean over the valid queries after each key. Texts of unequal length, so some
    batches are padded (the per-sample sums) and one is not (the whole-batch sum)."""
    handle = wb.load_model("tiny-random-llama", device="cuda", dtype="bfloat16")
    texts = [PROSE[0], PROSE[1][:40], PROSE[2][:60]]
    padded = wb.capture(handle, texts, ["attn_received"], progress=False)
    one_by_one = wb.capture(handle, texts, ["attn_received"], batch_size=1, progress=False)
    out, enc = _hf_forward(handle, texts)
    for (i, ids), run in [(item, run) for item in enumerate(enc) for run in (padded, one_by_one)]:
        n = len(ids)
        for layer in range(handle.n_layers):
            a = out.attentions[layer][i, :, :n, :n].double().cpu().numpy()  # (head, q, k)
            want = np.full(a.shape[:2], np.nan)
            for k in range(n - 1):
                want[:, k] = a[:, k + 1 :, k].mean(axis=1)
            got = run.attn_received.isel(sample=i).sel(layer=layer).values[:, :n]
            assert _worst(got, want) <= 1e-5, (i, layer)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backends_agree_on_cuda(backend, arch):
    handle = wb.load_model(f"tiny-random-{arch}", device="cuda")
    probes = ["resid_pre", "resid_post", "attn_received", "value_norm", "logits"]
    ref = wb.capture(handle, TEXTS, probes, progress=False)
    other = wb.capture(handle, TEXTS, probes, backend=backend, progress=False)
    worst = {name: _worst(ref[name], other[name]) for name in ref.data_vars if name != "top_k_ids"}
    assert max(worst.values()) <= 1e-5, f"{backend} on {arch}: {worst}"


def test_head_ablation_on_cuda_equals_cpu():
    results = []
    for device in ("cpu", "cuda"):
        handle = wb.load_model("tiny-random-llama", device=device)
        ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]], device=device)
        plain = token_logprobs(handle, ids)
        with ablate_heads(handle, {0: [0, 1], 1: [3]}, mode="sink"):
            ablated = token_logprobs(handle, ids)
        assert (plain - ablated).abs().max() > 1e-4  # the ablation does something
        results.append(ablated.cpu())
    assert (results[0] - results[1]).abs().max() <= 1e-4


def test_byte_level_on_cuda_equals_cpu():
    text = "The cat sat on the m"
    dists = []
    for device in ("cpu", "cuda"):
        blm = ByteLevelModel(wb.load_model("tiny-random-llama", device=device))
        dists.append(blm.next_byte_distribution(text).values)
    assert abs(dists[1].sum() - 1) < 1e-6
    assert np.abs(dists[0] - dists[1]).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_shaped_model_on_cuda(dtype):
    """SmolLM2-135M's shape (30 layers, 9 heads over 3 KV heads), random weights: residuals equal HF's."""
    handle = wb.load_model("random-smollm2-135m", device="cuda", dtype=dtype)
    assert next(handle.hf_model.parameters()).device.type == "cuda"
    run = wb.capture(handle, TEXTS, ["resid_pre", "attn_received", "value_norm", "logits"], progress=False)
    out, enc = _hf_forward(handle, TEXTS)
    tol = 0.0 if dtype == "bfloat16" else 1e-6
    for i, ids in enumerate(enc):
        n = len(ids)
        for layer in (0, 15, 29):
            got = run.resid_pre.isel(sample=i, pos=slice(0, n)).sel(layer=layer)
            assert _worst(got, out.hidden_states[layer][i, :n].float().cpu()) <= tol
    assert bool(np.isfinite(run.value_norm.where(run.valid, 0.0)).all())  # padding is NaN by design
