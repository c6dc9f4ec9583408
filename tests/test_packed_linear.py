"""Linear layers on packed oneDNN weights (token scoring's speed-up): the same logits as Hugging Face's own forward
to float32 rounding, switched on only inside the block, repacked when the weights change, skipped where it does
not apply."""

import copy

import pytest
import torch

from workbench.models.tiny import tiny_model
from workbench.probes.packed_linear import applies, packed_linears

pytestmark = pytest.mark.skipif(not applies(tiny_model("llama")), reason="oneDNN's packed linear is not in this build")


def _logits(handle, ids):
    with torch.no_grad():
        return handle.hf_model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt_neox"])
def test_same_logits_as_the_plain_forward(architecture):
    handle = tiny_model(architecture)
    ids = list(range(40, 80))
    plain = _logits(handle, ids)
    with handle.lock, packed_linears(handle) as on:
        assert on
        linears = [m for m in handle.hf_model.modules() if type(m) is torch.nn.Linear]
        assert linears and all("forward" in m.__dict__ for m in linears)
        packed = _logits(handle, ids)
    assert not any("forward" in m.__dict__ for m in linears)  # the modules are as they were
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_real_model_logits_and_a_scored_sequence(smollm2):
    ids = smollm2.tokenizer("The history of the city begins with a small settlement")["input_ids"]
    plain = _logits(smollm2, ids)
    with smollm2.lock, packed_linears(smollm2):
        packed = _logits(smollm2, ids)
    assert (packed - plain).abs().max().item() < 1e-4 and torch.equal(packed.argmax(-1), plain.argmax(-1))


def test_a_handle_that_packed_its_weights_still_copies_and_pickles():
    import pickle

    handle = tiny_model("llama")
    with handle.lock, packed_linears(handle):
        pass
    assert "_packed_linears" in handle.__dict__
    for twin in (copy.deepcopy(handle), pickle.loads(pickle.dumps(handle))):
        assert "_packed_linears" not in twin.__dict__
        torch.testing.assert_close(_logits(twin, list(range(40, 60))), _logits(handle, list(range(40, 60))),
                                   rtol=0, atol=0)
        with twin.lock, packed_linears(twin):  # packs its own
            torch.testing.assert_close(_logits(twin, list(range(40, 60))), _logits(handle, list(range(40, 60))),
                                       atol=1e-5, rtol=1e-5)


def test_restored_after_an_error_reentrant_and_repacked_after_an_edit():
    handle = tiny_model("llama")
    ids = list(range(40, 60))
    with pytest.raises(RuntimeError, match="stop"):
        with handle.lock, packed_linears(handle):
            raise RuntimeError("stop")
    assert not any("forward" in m.__dict__ for m in handle.hf_model.modules())
    with handle.lock, packed_linears(handle), packed_linears(handle) as inner:
        assert inner  # the outer block's packing stays on
    assert not any("forward" in m.__dict__ for m in handle.hf_model.modules())
    with torch.no_grad():
        handle.hf_model.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # edited in place: the packing is stale
    plain = _logits(handle, ids)
    with handle.lock, packed_linears(handle):
        packed = _logits(handle, ids)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_float64_models_and_a_switched_off_packing_run_unchanged(monkeypatch):
    monkeypatch.setenv("WORKBENCH_PACKED_LINEAR", "0")
    assert not applies(tiny_model("llama"))
    monkeypatch.delenv("WORKBENCH_PACKED_LINEAR")
    handle = copy.deepcopy(tiny_model("llama"))
    handle.hf_model.double()
    assert not applies(handle)
    with handle.lock, packed_linears(handle) as on:
        assert not on and not any("forward" in m.__dict__ for m in handle.hf_model.modules())


def test_modules_another_library_wrapped_keep_their_wrapper():
    """nnsight replaces each module's forward with its own; a packing made before that must not remove it."""
    import workbench as wb

    handle = tiny_model("llama")
    with handle.lock, packed_linears(handle):
        pass
    before = wb.capture(handle, ["hello world"], ["resid_post"], backend="nnsight", progress=False)
    wrapped = {id(m): m.__dict__["forward"] for m in handle.hf_model.modules() if "forward" in m.__dict__}
    assert wrapped
    with handle.lock, packed_linears(handle):
        packed = _logits(handle, list(range(40, 60)))
    assert {id(m): m.__dict__["forward"] for m in handle.hf_model.modules() if "forward" in m.__dict__} == wrapped
    after = wb.capture(handle, ["hello world"], ["resid_post"], backend="nnsight", progress=False)
    torch.testing.assert_close(torch.as_tensor(after["resid_post"].values), torch.as_tensor(before["resid_post"].values),
                               rtol=0, atol=0)
    torch.testing.assert_close(packed, _logits(handle, list(range(40, 60))), atol=1e-5, rtol=1e-5)
