"""Every probe on every tiny architecture equals Hugging Face's own outputs, on every backend.

Tiny randomly initialised models (``workbench.models.tiny``) carry each family's structure:
fused QKV, parallel blocks, sandwich norms, grouped / multi-query KV heads, ALiBi, MoE MLPs,
learned positions. Independent references: HF ``output_hidden_states`` (residual stream and
final norm), ``output_attentions`` (patterns), ``.logits``; the update identity
``resid_pre + attn_out + mlp_out = resid_post``; and ``z_h = A_h v_h`` (each head's output is its
pattern times its values), which checks the value vectors read out of fused QKV projections.
"""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.probes import hooks
from workbench.probes import sites as S
from workbench.probes.catalog import logit_summaries
from workbench.models.tiny import TINY_ARCHITECTURES, save_tiny_model

from .conftest import PROSE, hf_forward

ALL_PROBES = ["resid_pre", "resid_post", "final_norm", "attn_pattern", "attn_received", "value_norm", "logits",
              "attn_out", "mlp_out"]
TEXTS = PROSE[:3]


@pytest.fixture(scope="module")
def tiny_models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = wb.load_model(f"tiny-random-{arch}")
        return cache[arch]

    return get


def _max_diff(a, b):
    return float(np.nanmax(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_every_probe_equals_hugging_face(tiny_models, arch):
    handle = tiny_models(arch)
    assert handle.sites.unsupported == {}, handle.sites.unsupported
    run = wb.capture(handle, TEXTS, ALL_PROBES, batch_size=len(TEXTS), progress=False)
    order = sorted(range(len(TEXTS)), key=lambda i: -len(handle.tokenizer(TEXTS[i])["input_ids"]))
    out, ids, _ = hf_forward(handle, [TEXTS[i] for i in order])
    worst = 0.0
    for row, i in enumerate(order):
        n = int(run.n_tokens[i])
        s = run.isel(sample=i, pos=slice(0, n))
        for layer in range(handle.n_layers):
            worst = max(worst, _max_diff(s.resid_pre.sel(layer=layer), out.hidden_states[layer][row, :n]))
            worst = max(worst, _max_diff(s.attn_pattern.sel(layer=layer).isel(key_pos=slice(0, n)),
                                         out.attentions[layer][row, :, :n, :n]))
            if layer < handle.n_layers - 1:
                worst = max(worst, _max_diff(s.resid_post.sel(layer=layer), out.hidden_states[layer + 1][row, :n]))
        worst = max(worst, _max_diff(s.final_norm, out.hidden_states[-1][row, :n]))
        expected = logit_summaries(out.logits[row : row + 1, :n], ids[row : row + 1, :n], run.attrs["top_k"])
        for name in ("next_token_logprob", "entropy", "top_k_logprobs"):
            worst = max(worst, _max_diff(s[name], expected[name][0].numpy()))
    assert worst <= 1e-5, f"{arch}: max abs diff {worst:.2e}"
    identity = _max_diff(run.resid_pre + run.attn_out + run.mlp_out, run.resid_post)
    assert identity <= 1e-5, f"{arch}: resid_pre + attn_out + mlp_out differs from resid_post by {identity:.2e}"


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_head_outputs_are_pattern_times_values(tiny_models, arch):
    """z_h[q] = sum_k A_h[q, k] v_{kv(h)}[k]: ties hook_v (fused QKV split included), hook_pattern and hook_z."""
    handle = tiny_models(arch)
    got = {}
    ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]])
    hooks.forward(handle, ids, reads=[(S.V, 1), (S.PATTERN, 1), (S.Z, 1)],
                  on_site=lambda s, l, x: got.__setitem__(s, x.clone()))
    v, pattern, z = got[S.V], got[S.PATTERN], got[S.Z]
    assert v.shape[2] == handle.n_kv_heads and z.shape[2] == handle.n_heads
    v = v.repeat_interleave(handle.n_heads // handle.n_kv_heads, dim=2)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_backends_agree(tiny_models, arch):
    handle = tiny_models(arch)
    runs = {b: wb.capture(handle, TEXTS, ALL_PROBES, backend=b, progress=False) for b in wb.probes.BACKENDS}
    for backend in ("nnsight", "transformer_lens"):
        for name in runs["torch"].data_vars:
            np.testing.assert_allclose(runs[backend][name].values, runs["torch"][name].values, rtol=1e-5, atol=2e-5,
                                       err_msg=f"{arch} {backend} {name}")


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_unembed_reproduces_the_output(tiny_models, arch):
    """Final norm + unembedding + the model's own soft-cap / logit scale = HF logits (the lens at the last layer)."""
    handle = tiny_models(arch)
    ids = torch.tensor([handle.tokenizer(PROSE[1])["input_ids"]])
    got = {}
    out = hooks.forward(handle, ids, reads=[(S.RESID_POST, handle.n_layers - 1)],
                        on_site=lambda s, l, x: got.__setitem__(s, x.clone()))
    with torch.no_grad():
        torch.testing.assert_close(handle.sites.unembed(got[S.RESID_POST]), out.logits, rtol=1e-5, atol=1e-5)


def test_value_norm_uses_each_heads_output_weights(tiny_models):
    """||v W_O^h|| from the probe equals the norm of the head's own write into the residual (GPT-2, fused QKV, Conv1D)."""
    handle = tiny_models("gpt2")
    run = wb.capture(handle, PROSE[0], ["value_norm"], progress=False)
    got = {}
    ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]])
    hooks.forward(handle, ids, reads=[(S.V, 0)], on_site=lambda s, l, x: got.__setitem__(s, x.clone()))
    c_proj = handle.hf_model.transformer.h[0].attn.c_proj.weight  # Conv1D: (h * d_h, d_model)
    d_h = handle.head_dim
    for h in range(handle.n_heads):
        direct = (got[S.V][0, :, h] @ c_proj[h * d_h : (h + 1) * d_h]).norm(dim=-1)
        np.testing.assert_allclose(run.value_norm.sel(layer=0, head=h).values[0], direct.numpy(), rtol=1e-5)


def test_edits_change_the_forward_pass(tiny_models):
    """Zeroing every attention update through the site map equals the same edit made in the weights."""
    handle = tiny_models("gpt_neox")
    ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]])
    edits = {(S.ATTN_OUT, layer): torch.zeros_like for layer in range(handle.n_layers)}
    edited = hooks.forward(handle, ids, edits=edits).logits
    saved = {n: p.clone() for n, p in handle.hf_model.named_parameters() if "attention.dense" in n}
    try:
        with torch.no_grad():
            for n, p in handle.hf_model.named_parameters():
                if "attention.dense" in n:
                    p.zero_()
            direct = handle.hf_model(ids).logits
    finally:
        with torch.no_grad():
            for n, p in handle.hf_model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    torch.testing.assert_close(edited, direct)
    assert not torch.allclose(edited, hooks.forward(handle, ids).logits)


def test_unsupported_site_is_named_before_any_forward(tiny_models, monkeypatch):
    handle = tiny_models("opt")
    monkeypatch.setattr(handle.hf_model.config, "do_layer_norm_before", False)
    handle.__dict__.pop("_site_map", None)
    try:
        with pytest.raises(S.UnsupportedSiteError, match=r"attn_out.*post-LayerNorm OPT"):
            wb.capture(handle, "hi", ["resid_pre", "attn_out"], progress=False)
    finally:
        handle.__dict__.pop("_site_map", None)


def test_unknown_architecture_fails_at_load(tmp_path):
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BioGptForCausalLM(config).save_pretrained(tmp_path)
    wb.load_model("tiny-random-llama").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(wb.probes.UnsupportedArchitectureError, match="gpt2"):
        wb.load_model(str(tmp_path))


def test_user_folder_loads_like_a_hub_model(tmp_path):
    save_tiny_model("gpt_neox", tmp_path / "neox")
    handle = wb.load_model(str(tmp_path / "neox"))
    run = wb.capture(handle, PROSE[:2], ["resid_pre", "attn_out", "mlp_out", "resid_post"], progress=False)
    assert run.attrs["architecture"] == "gpt_neox"
    assert _max_diff(run.resid_pre + run.attn_out + run.mlp_out, run.resid_post) <= 1e-5


def test_transformer_bridge_follows_weight_and_dtype_changes(tiny_models):
    handle = wb.load_model("tiny-random-qwen2")
    before = wb.capture(handle, PROSE[0], ["logits"], backend="transformer_lens", progress=False)
    with torch.no_grad():
        handle.hf_model.lm_head.weight.mul_(2.0)
    after = wb.capture(handle, PROSE[0], ["logits"], backend="transformer_lens", progress=False)
    reference = wb.capture(handle, PROSE[0], ["logits"], backend="torch", progress=False)
    assert not np.allclose(before.entropy.values, after.entropy.values, equal_nan=True)
    np.testing.assert_allclose(after.entropy.values, reference.entropy.values, rtol=1e-5)
    handle.hf_model.to(torch.float64)
    assert handle.transformer_bridge().cfg.dtype == torch.float64 or next(handle.transformer_bridge().parameters()).dtype == torch.float64


def test_readme_checkpoint_sweep_runs_as_written(tmp_path, monkeypatch):
    """The README's checkpoint-sweep loop, executed verbatim against tiny GPT-NeoX (Pythia's architecture) folders."""
    import re
    from pathlib import Path

    from workbench.analyses.next_token_law import law_fit, prediction_residuals
    from workbench.corpus import paragraphs

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "checkpoints/pythia" in b)
    steps = [int(s) for s in re.search(r"for step in \(([^)]*)\)", block).group(1).split(",")]
    for seed, step in enumerate(steps):
        save_tiny_model("gpt_neox", tmp_path / "checkpoints" / f"pythia-160m-step{step}", seed=seed)
    monkeypatch.chdir(tmp_path)
    printed = []
    namespace = {"wb": wb, "law_fit": law_fit, "prediction_residuals": prediction_residuals,
                 "texts": paragraphs()[:6], "print": lambda *a: printed.append(a)}
    exec(block, namespace)
    assert [p[0] for p in printed] == steps
    assert all(-1.0 <= p[1] <= 1.0 for p in printed)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_editing_values_equals_editing_the_value_weights(tiny_models, arch):
    """Scaling hook_v by 2 (through a fused QKV projection on GPT-2) equals doubling W_V and b_V."""
    handle = tiny_models(arch)
    ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]])
    edited = hooks.forward(handle, ids, edits={(S.V, 0): lambda v: v * 2}).logits
    spec = handle.sites.spec(S.V, 0)
    module = spec.module
    saved = {n: p.clone() for n, p in module.named_parameters()}
    try:
        with torch.no_grad():
            if arch == "gpt2":  # Conv1D (in, out): the value columns are the rows the site map found
                rows = handle.sites._fused_rows(0)[2]
                module.weight[:, rows] *= 2
                module.bias[rows] *= 2
            else:
                module.weight.mul_(2)
        direct = handle.hf_model(ids).logits
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(saved[n])
    torch.testing.assert_close(edited, direct, rtol=1e-5, atol=1e-5)


def test_read_only_sites_refuse_edits(tiny_models):
    handle = tiny_models("llama")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(S.UnsupportedSiteError, match="read but not edited"):
        hooks.forward(handle, ids, edits={(S.PATTERN, 0): lambda a: a * 0})


def test_nnsight_backend_after_other_captures(tiny_models):
    """Regression: a second nnsight capture reading other sites (the root output) must not trip nnsight's call counters."""
    handle = wb.load_model("tiny-random-llama")
    first = wb.capture(handle, PROSE[:2], ["resid_pre"], backend="nnsight", progress=False)
    second = wb.capture(handle, PROSE[:2], ["logits", "value_norm"], backend="nnsight", progress=False)
    reference = wb.capture(handle, PROSE[:2], ["resid_pre", "logits", "value_norm"], backend="torch", progress=False)
    np.testing.assert_array_equal(first.resid_pre.values, reference.resid_pre.values)
    np.testing.assert_array_equal(second.entropy.values, reference.entropy.values)
