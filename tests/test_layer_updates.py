"""Layer updates: statistics on hand-built residuals, tokenwise fits on known maps, Hugging Face as the reference.

(The identity ``resid_post - resid_pre = attn_out + mlp_out`` on every architecture is tested in
``test_architectures.py``.)
"""

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench.analyses import layer_updates as lu
from workbench.probes.interventions import delete_layers, next_token_distributions
from workbench.numerics import kl_from_logprobs

from .conftest import PROSE


def _run(pre: np.ndarray, post: np.ndarray, valid=None) -> xr.Dataset:
    """A run-shaped dataset: (sample, pos, layer, d_model) residuals."""
    s, p = pre.shape[:2]
    valid = np.ones((s, p), bool) if valid is None else valid
    dims = ("sample", "pos", "layer", "d_model")
    return xr.Dataset({"resid_pre": (dims, pre), "resid_post": (dims, post)},
                      coords={"valid": (("sample", "pos"), valid), "sample": np.arange(s), "pos": np.arange(p),
                              "layer": np.arange(pre.shape[2])})


def test_statistics_hand_built():
    pre = np.array([3.0, 4.0])[None, None, None]  # ||h|| = 5
    post = np.array([3.0, 4.0 + 5.0])[None, None, None]  # u = (0, 5)
    st = lu.update_statistics(_run(pre, post)).isel(sample=0, pos=0, layer=0)
    assert float(st.residual_norm) == pytest.approx(5)
    assert float(st.update_norm) == pytest.approx(5)
    assert float(st.relative_update) == pytest.approx(1)
    assert float(st.update_cosine) == pytest.approx(4 / 5)  # (0,5).(3,4) / (5 * 5)
    assert float(st.norm_change) == pytest.approx(np.hypot(3, 9) / 5)
    assert float(st.direction_change) == pytest.approx(1 - (9 + 36) / (5 * np.hypot(3, 9)))
    assert float(st.contribution) == pytest.approx(5 / np.hypot(3, 9))


def test_padding_is_nan_and_sinks_are_apart():
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(2, 5, 3, 4))
    pre[:, 0] *= 100  # position 0: a residual peak in every sample
    post = pre + rng.normal(size=pre.shape)
    valid = np.ones((2, 5), bool)
    valid[1, 4] = False
    run = _run(pre, post, valid)
    st = lu.update_statistics(run)
    assert np.isnan(st.update_norm.isel(sample=1, pos=4)).all()
    sinks = lu.sink_tokens(run)
    assert sinks.values.tolist() == [[True, False, False, False, False], [True, False, False, False, False]]
    profile = lu.depth_profile(st, sinks)
    assert profile.n_tokens.values.tolist() == [7, 2]
    expected = np.median(np.linalg.norm(pre[:, 0], axis=-1), axis=0)
    np.testing.assert_allclose(profile.residual_norm.sel(tokens="sink"), expected)


def test_tokenwise_fit_recovers_a_known_map():
    rng = np.random.default_rng(1)
    d, s, p = 6, 12, 40
    w = rng.normal(size=(d, 2)) @ rng.normal(size=(2, d))  # a rank-2 map
    b = rng.normal(size=d)
    pre = rng.normal(size=(s, p, 1, d))
    post = pre + pre @ w + b
    fits, fit = lu.tokenwise_fit(_run(pre, post), ranks=(1, 2), ridge=1e-9, normalize=False, progress=False)
    r2 = fits.r2.isel(layer=0)
    assert float(r2.sel(fit="full")) == pytest.approx(1, abs=1e-6)
    assert float(r2.sel(fit="rank 2")) == pytest.approx(1, abs=1e-6)
    assert float(r2.sel(fit="rank 1")) < 0.95
    assert float(fits.alignment.sel(fit="full", layer=0)) == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(fit.weight["full", 0], w, atol=1e-6)
    assert fits.attrs["train_prompts"] == 9 and fits.attrs["test_prompts"] == 3


def test_tokenwise_fit_bad_input():
    run = _run(np.zeros((1, 3, 1, 2)), np.zeros((1, 3, 1, 2)))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        lu.tokenwise_fit(run, progress=False)
    run = _run(np.zeros((2, 3, 1, 2)), np.zeros((2, 3, 1, 2)))
    with pytest.raises(IndexError, match="layers 0..0"):
        lu.tokenwise_fit(run, layers=[1], progress=False)
    with pytest.raises(ValueError, match="ranks"):
        lu.tokenwise_fit(run, ranks=(3,), progress=False)
    with pytest.raises(KeyError, match="resid_post"):
        lu.update_statistics(run.drop_vars("resid_post"))


def test_replacing_an_update_by_zero_is_deleting_the_layer(tiny):
    """A 'fit' that predicts no update: the replaced pass is the layer deleted (an independent code path)."""
    ids = torch.tensor([tiny.tokenizer(PROSE[0])["input_ids"][:10]])
    d = tiny.d_model
    zero = lu.TokenwiseFit({("zero", 1): np.zeros((d, d))}, {("zero", 1): np.zeros(d)})
    effect = lu.fit_residual_effect(tiny, ids, None, zero, label="zero", skip_first=1, progress=False)
    base = next_token_distributions(tiny, ids)
    with delete_layers(tiny, [1]):
        deleted = next_token_distributions(tiny, ids)
    expected = kl_from_logprobs(base, deleted)[0, 1:].clamp_min(0).mean()
    assert float(effect.mean_kl.sel(layer=1)) == pytest.approx(float(expected), rel=1e-5)
    assert effect.attrs["tokens"] == 9 and np.isfinite(effect.spearman).all()


def test_update_statistics_against_hugging_face(smollm2):
    run = wb.capture(smollm2, PROSE[:2], ["resid_pre", "resid_post"], progress=False)
    st = lu.update_statistics(run)
    ids = torch.tensor([smollm2.tokenizer(PROSE[0])["input_ids"]])
    with torch.no_grad():
        hidden = smollm2.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    n = ids.shape[1]
    for layer in (0, 5, 28):  # HF's last hidden state is after the final norm: compare inside the stack
        u = (hidden[layer + 1] - hidden[layer])[0].double()
        np.testing.assert_allclose(st.update_norm.isel(sample=0, layer=layer, pos=slice(0, n)), u.norm(dim=-1),
                                   rtol=1e-4)
        cos = torch.nn.functional.cosine_similarity(u, hidden[layer][0].double(), dim=-1)
        np.testing.assert_allclose(st.update_cosine.isel(sample=0, layer=layer, pos=slice(0, n)), cos, atol=1e-4)


def test_tokenwise_fit_of_the_direction():
    """An update that is a linear map of the token's direction (what RMSNorm passes on): exact with
    normalize=True, not with a map linear in the raw state (norms vary 100x)."""
    rng = np.random.default_rng(2)
    d, s, p = 5, 10, 40
    pre = rng.normal(size=(s, p, 1, d)) * np.exp(rng.uniform(0, np.log(100), size=(s, p, 1, 1)))
    direction = pre / np.linalg.norm(pre, axis=-1, keepdims=True) * np.sqrt(d)
    w, b = rng.normal(size=(d, d)), rng.normal(size=d)
    run = _run(pre, pre + direction @ w + b)
    on_direction, fit = lu.tokenwise_fit(run, ranks=(), ridge=1e-9, progress=False)
    on_state, _ = lu.tokenwise_fit(run, ranks=(), ridge=1e-9, normalize=False, progress=False)
    assert float(on_direction.r2.sel(fit="full", layer=0)) == pytest.approx(1, abs=1e-6)
    assert float(on_state.r2.sel(fit="full", layer=0)) < 0.9
    h = torch.from_numpy(pre[0, :3, 0])
    np.testing.assert_allclose(fit.predict("full", 0, h).numpy(), (direction @ w + b)[0, :3, 0], atol=1e-6)
