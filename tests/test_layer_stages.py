"""Stages of inference: layer deletion and swaps, scored against independent computations.

Known answers: a layer whose output weights are zero writes nothing, so deleting it changes
nothing (KL 0, every top-1 kept); swapping twice is the original model exactly. Independent:
deleting a layer equals Hugging Face's own forward pass of a copy of the model with that block
removed from its layer list, and the sweep's KL equals scipy's on the two distributions.
"""

import copy

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

import workbench as wb
from workbench.analyses.layer_stages import interventions, layer_intervention_sweep
from workbench.probes.interventions import delete_layers, next_token_distributions, swap_layers

from .conftest import PROSE


def _ids(handle, texts=PROSE[:2], n=10):
    return torch.tensor([handle.tokenizer(t)["input_ids"][:n] for t in texts])


def test_plan_and_bad_layers():
    assert interventions(3) == [("delete", 0), ("delete", 1), ("delete", 2), ("swap", 0), ("swap", 1)]
    assert interventions(3, [2], kinds=("swap",)) == []
    with pytest.raises(IndexError, match="layers 0..2"):
        interventions(3, [3])
    with pytest.raises(ValueError, match="delete"):
        interventions(3, kinds=("drop",))


def test_a_layer_that_writes_nothing_can_be_deleted_for_free():
    silent = wb.load_model("tiny-random-llama")  # a fresh copy: its weights are ours to change
    block = silent.hf_model.model.layers[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    sweep = layer_intervention_sweep(silent, _ids(silent), layers=[1], kinds=("delete",), progress=False)
    assert float(sweep.kl.sel(intervention="delete 1")) == pytest.approx(0, abs=1e-9)
    assert float(sweep.top1_retention.sel(intervention="delete 1")) == 1.0
    assert float(sweep.loss_change.sel(intervention="delete 1")) == pytest.approx(0, abs=1e-6)


def test_swapping_twice_and_deleting_are_undone(tiny):
    ids = _ids(tiny)
    base = next_token_distributions(tiny, ids)
    with swap_layers(tiny, 0):
        once = next_token_distributions(tiny, ids)
        with swap_layers(tiny, 0):
            twice = next_token_distributions(tiny, ids)
    assert not torch.equal(once, base)
    assert torch.equal(twice, base)
    with delete_layers(tiny, [1]):
        assert not torch.equal(next_token_distributions(tiny, ids), base)
    assert torch.equal(next_token_distributions(tiny, ids), base)


def test_sweep_kl_equals_scipy(tiny):
    ids = _ids(tiny)
    sweep = layer_intervention_sweep(tiny, ids, progress=False)
    p = next_token_distributions(tiny, ids)[:, :-1].exp().double().numpy()
    with swap_layers(tiny, 0):
        q = next_token_distributions(tiny, ids)[:, :-1].exp().double().numpy()
    expected = rel_entr(p, q).sum(-1).mean()
    assert float(sweep.kl.sel(intervention="swap 0-1")) == pytest.approx(expected, rel=1e-4)
    assert float(sweep.top1_retention.sel(intervention="swap 0-1")) == pytest.approx(
        (p.argmax(-1) == q.argmax(-1)).mean())
    assert sweep.attrs["forward_passes"] == 4 and sweep.attrs["tokens"] == ids[:, 1:].numel()
    assert ((sweep.top1_retention >= 0) & (sweep.top1_retention <= 1)).all() and (sweep.kl >= 0).all()


def test_padding_is_left_out(tiny):
    a, b = tiny.tokenizer(PROSE[0])["input_ids"][:9], tiny.tokenizer(PROSE[1])["input_ids"][:6]
    padded = torch.tensor([a, b + [0] * 3])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    both = layer_intervention_sweep(tiny, padded, mask, progress=False)
    alone = [layer_intervention_sweep(tiny, torch.tensor([x]), progress=False) for x in (a, b)]
    weights = np.array([8, 5]) / 13
    np.testing.assert_allclose(both.kl, weights[0] * alone[0].kl + weights[1] * alone[1].kl, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_deleting_a_layer_equals_hugging_face_without_it(smollm2, layer):
    ids = _ids(smollm2, PROSE[:1], 12)
    with delete_layers(smollm2, [layer]):
        ours = next_token_distributions(smollm2, ids)
    pruned = copy.deepcopy(smollm2.hf_model)
    del pruned.model.layers[layer]
    pruned.config.num_hidden_layers -= 1
    with torch.no_grad():
        theirs = torch.log_softmax(pruned(input_ids=ids, use_cache=False).logits.float(), -1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
