"""Logit lens and tuned lens: exact at the last layer, statistics against direct computation, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.analyses.lens import lens_statistics, lens_summary
from workbench.corpus import paragraphs
from workbench.probes.lens import TunedLens, lens_logits, train_tuned_lens
from workbench.probes.streaming import token_windows
from workbench.runs import open_result, save_result

from .conftest import PROSE, hf_forward


def _hf_logits(handle, text):
    ids = torch.tensor([handle.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return handle.hf_model(ids, use_cache=False).logits[0]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_logit_lens_at_the_last_layer_is_the_models_output(name, request):
    handle = request.getfixturevalue(name)
    run = wb.capture(handle, PROSE[:2], probes=["resid_post"], progress=False)
    out, _, _ = hf_forward(handle, PROSE[:2])  # the same right-padded batch
    # the lens on the whole batch (padding rows are NaN and stay in their rows): the same matmul shapes as HF's
    lens = lens_logits(handle, torch.from_numpy(run.resid_post.isel(layer=-1).values))
    for s in range(2):
        n = int(run.n_tokens[s])
        assert torch.equal(lens[s, :n], out.logits[s, :n])


def test_lens_statistics_match_a_direct_computation(tiny):
    run = wb.capture(tiny, PROSE, probes=["resid_post"], progress=False)
    stats = lens_statistics(run, tiny, top_k=3)
    s, layer = 0, 0
    n = int(run.n_tokens[s])
    h = torch.from_numpy(run.resid_post.isel(sample=s, layer=layer).values[:n])
    logq = torch.log_softmax(lens_logits(tiny, h), -1)
    final = torch.log_softmax(_hf_logits(tiny, PROSE[s]), -1)
    ids = run.token_id.values[s, :n]
    np.testing.assert_allclose(stats.cross_entropy.values[s, : n - 1, layer], -logq[np.arange(n - 1), ids[1:]], rtol=1e-5)
    assert np.isnan(stats.cross_entropy.values[s, n - 1, layer])
    kl = (final.exp() * (final - logq)).sum(-1)
    np.testing.assert_allclose(stats.kl_to_final.values[s, :n, layer], kl, rtol=1e-4, atol=1e-6)
    rank = (logq > logq.gather(-1, final.argmax(-1, keepdim=True))).sum(-1)
    np.testing.assert_array_equal(stats.final_top1_rank.values[s, :n, layer], rank)
    np.testing.assert_array_equal(stats.top_k_ids.values[s, :n, layer], logq.topk(3).indices)
    last = stats.sel(layer=tiny.n_layers - 1)  # the lens at the last layer is the output itself
    assert (last.final_top1_rank.values[run.valid.values] == 0).all()
    np.testing.assert_allclose(last.kl_to_final.values[run.valid.values], 0, atol=1e-5)
    first = stats.first_agreeing_layer.values
    assert ((first >= 0) == run.valid.values).all()
    summary = lens_summary(stats)
    assert summary.top1_agreement.sel(layer=tiny.n_layers - 1).item() == 1.0


def test_tuned_lens_trains_saves_loads_and_beats_the_logit_lens(tiny, tmp_path):
    windows = token_windows(tiny, paragraphs()[:40], window=128)
    lens = train_tuned_lens(tiny, windows, max_tokens=1500, steps=3, batch_tokens=32, progress=False)
    assert lens.info["tokens_train"] + lens.info["tokens_eval"] == lens.info["tokens_collected"] <= 1500
    assert lens.info["heldout_mean_kl_init"] < lens.info["heldout_mean_kl_logit_lens"]
    assert torch.equal(lens.weight[-1], torch.zeros_like(lens.weight[-1]))  # last layer: identity
    path = save_result(lens.to_dataset(), tmp_path / "lens.nc")
    again = TunedLens.from_dataset(open_result(path))
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias)
    run = wb.capture(tiny, PROSE[:2], probes=["resid_post"], progress=False)
    tuned = lens_statistics(run, tiny, again)
    assert tuned.attrs["lens"] == "tuned"
    assert np.isnan(tuned.cross_entropy.values[:, 0, 0]).all()  # never trained on the sink position
    assert np.isfinite(tuned.kl_to_final.values[:, 0, -1]).all()  # the last layer is the output itself
    np.testing.assert_allclose(tuned.kl_to_final.sel(layer=1).values, lens_statistics(run, tiny).kl_to_final.sel(layer=1).values)


def test_tuned_lens_refuses_another_model(tiny, smollm2):
    with pytest.raises(ValueError, match="train one for this model"):
        TunedLens.identity(tiny).check_model(smollm2)
    with pytest.raises(ValueError, match="not a saved tuned lens"):
        TunedLens.from_dataset(wb.capture(tiny, "Hi", probes=["resid_norm"], progress=False))


def test_lens_statistics_need_resid_post(tiny):
    run = wb.capture(tiny, "Hello there", probes=["resid_norm"], progress=False)
    with pytest.raises(KeyError, match="resid_post"):
        lens_statistics(run, tiny)
