"""nnsight remote execution: the request a remote capture sends, run through nnsight's local simulation (serialised,
deserialised, run in this process), gives the same run as the local hooks; a model loaded without weights for
remote use refuses everything it cannot do before any forward pass. NDIF itself needs a network and an API key,
which the tests do not have."""

import numpy as np
import pytest

import workbench as wb
from workbench.probes.backends import _execution_order

from .conftest import PROSE


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_remote_request_gives_the_local_run(architecture):
    model = wb.load_model(f"tiny-random-{architecture}")
    probes = list(wb.PROBES)
    simulated = wb.capture(model, PROSE[:3], probes, backend="nnsight", remote="local", batch_size=2, progress=False)
    local = wb.capture(model, PROSE[:3], probes, backend="torch", batch_size=2, progress=False)
    for probe in local.data_vars:
        np.testing.assert_allclose(simulated[probe].values, local[probe].values, rtol=1e-5, atol=1e-6, err_msg=probe)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma3_text"])
def test_a_model_without_weights_knows_its_structure_and_refuses_local_work(architecture, tmp_path):
    real = wb.load_model(f"tiny-random-{architecture}")
    real.hf_model.config.save_pretrained(tmp_path)  # config and tokenizer only, as for a hosted model
    real.tokenizer.save_pretrained(tmp_path)
    hosted = wb.load_model(str(tmp_path), remote=True)
    assert hosted.device.type == "meta" and hosted.n_layers == real.n_layers and hosted.n_kv_heads == real.n_kv_heads
    # the order nnsight must read the slots in, learned on a tiny stand-in, is the real model's
    assert _execution_order(hosted) == _execution_order(real)
    with pytest.raises(ValueError, match="no weights here"):
        wb.capture(hosted, "hello", ["resid_pre"], progress=False)
    with pytest.raises(ValueError, match="backend='nnsight'"):
        wb.capture(hosted, "hello", ["resid_pre"], remote=True, progress=False)
    with pytest.raises(ValueError, match="hub id"):  # a folder is not a model NDIF hosts
        wb.capture(hosted, "hello", ["resid_pre"], backend="nnsight", remote=True, progress=False)
    hosted.hub_id = "org/hosted-model"
    with pytest.raises(ValueError, match="W_O"):
        wb.capture(hosted, "hello", ["resid_pre", "value_norm"], backend="nnsight", remote=True, progress=False)
    with pytest.raises(ValueError, match="remote must be"):
        wb.capture(real, "hello", ["resid_pre"], backend="nnsight", remote="yes", progress=False)
    with pytest.raises(wb.ModelNotAvailableError, match="allow_download"):
        wb.load_model("org/hosted-model", remote=True)
    with pytest.raises(ValueError, match="nothing to place"):
        wb.load_model(str(tmp_path), remote=True, device_map="auto")
