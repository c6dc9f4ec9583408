"""Extreme-token metrics: hand-built answers, and the real model against Hugging Face's own outputs."""

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.analyses import extreme_tokens as et
from workbench.analyses import MissingProbeError
from workbench.corpus import domain_samples, load_corpus

from .conftest import PROSE, hf_forward


def _run(**variables):
    """A minimal hand-built run: 2 samples x 4 positions, the second with one padding position."""
    coords = {
        "sample": [0, 1],
        "pos": np.arange(4),
        "key_pos": np.arange(4),
        "valid": (("sample", "pos"), np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)),
        "n_tokens": ("sample", [4, 3]),
        "token": (("sample", "pos"), np.array([["<s>", "a", ",", "b"], ["<s>", "c", "d", ""]])),
    }
    return xr.Dataset(variables, coords=coords)


def test_sink_scores_and_rate_hand_built():
    received = np.zeros((2, 1, 2, 4))  # (sample, layer, head, key_pos)
    received[:, 0, 0, 0] = 0.9  # head 0 sinks on the first token
    received[:, 0, 1, 0] = 0.1
    received[:, 0, 1, 2] = 0.6  # head 1 sinks on the comma
    received[1, ..., 3] = np.nan
    run = _run(attn_received=(("sample", "layer", "head", "key_pos"), received))
    np.testing.assert_allclose(et.sink_scores(run).values[:, 0], [[0.9, 0.1], [0.9, 0.1]])
    rate = et.sink_rate(run, threshold=0.3)
    np.testing.assert_allclose(rate.isel(sample=0, layer=0).values, [0.5, 0, 0.5, 0])
    assert np.isnan(rate.isel(sample=1, layer=0, key_pos=3))
    excluded = et.mean_attention_received(run, exclude_keys=(0,))
    assert np.isnan(excluded.isel(layer=0, key_pos=0)) and excluded.isel(layer=0, key_pos=2) == pytest.approx(0.3)
    with pytest.raises(IndexError, match="key_pos 7"):
        et.sink_scores(run, key_pos=7)


def test_top_attended_keys_skip_keys_with_few_later_queries():
    received = np.zeros((1, 1, 1, 8))
    received[0, 0, 0] = [0.5, 0.1, 0.3, 0.05, 0.9, 0.0, 0.0, 0.0]  # key 4 has only 3 later queries
    run = xr.Dataset(
        {"attn_received": (("sample", "layer", "head", "key_pos"), received)},
        coords={"sample": [0], "layer": [0], "head": [0], "key_pos": np.arange(8), "n_tokens": ("sample", [8]),
                "token": (("sample", "pos"), np.array([list("abcdefgh")]))},
    )
    top = et.top_attended_keys(run, k=2).isel(sample=0, layer=0, head=0)
    assert top.key.values.tolist() == [0, 2] and top.token.values.tolist() == ["a", "c"]
    np.testing.assert_allclose(top.score.values, [0.5, 0.3])


def test_value_drain_hand_built():
    norms = np.array([[1.0, 4.0, 6.0, 8.0], [2.0, 4.0, 8.0, 100.0]])[:, None, None, :]  # padding at [1, 3]
    run = _run(value_norm=(("sample", "layer", "head", "pos"), norms))
    drain = et.value_drain(run)
    np.testing.assert_allclose(drain.median_norm.values.ravel(), [5.0, 4.0])  # padding not counted
    np.testing.assert_allclose(drain.ratio.values.ravel(), [0.2, 0.5])


def test_residual_peak_span_hand_built():
    # sample 0: first-token norm 1, 50, 50, 1 (x median) over 4 layers; others have norm 1
    resid = np.ones((2, 4, 4, 1))
    resid[0, 0, :, 0] = [1, 50, 50, 1]
    resid[1, 0, :, 0] = [1, 1, 1, 1]
    resid[1, 3] = np.nan
    run = _run(resid_pre=(("sample", "pos", "layer", "d_model"), resid)).assign_coords(layer=np.arange(4))
    span = et.residual_peak_span(run, min_ratio=10)
    assert span.appears.values.tolist() == [1, -1] and span.fades.values.tolist() == [3, -1]
    assert span.max_ratio.values[0] == pytest.approx(50) and int(span.max_layer[0]) == 1


def test_massive_activations_hand_built():
    hidden = np.ones((2, 4, 2, 3))  # (sample, pos, layer, d_model), |a| = 1 everywhere
    hidden[0, 0, 1, 2] = -5000.0  # massive: > 100 and > 1000 x median (1)
    hidden[1, 0, 1, 2] = 4000.0
    hidden[0, 2, 0, 1] = 500.0  # > 100 but only 500 x median: not massive
    hidden[1, 3, 1, 0] = 1e6  # huge, but padding
    run = _run(resid_pre=(("sample", "pos", "layer", "d_model"), hidden)).assign_coords(layer=[0, 1])
    entries = et.massive_activations(run)
    assert entries.sizes["entry"] == 2
    assert entries.value.values.tolist() == [-5000.0, 4000.0]
    assert entries.dim.values.tolist() == [2, 2] and entries.pos.values.tolist() == [0, 0]
    assert entries.token.values.tolist() == ["<s>", "<s>"] and entries.layer.values.tolist() == [1, 1]
    dims = et.massive_dimensions(entries, n_samples=2)
    assert dims.dim.values.tolist() == [2] and float(dims.sample_fraction[0]) == 1.0


def test_classify_heads_hand_built():
    sink = xr.DataArray(np.array([[[0.9, 0.9, 0.1]]]), dims=("domain", "layer", "head"),
                        coords={"domain": ["prose"], "layer": [0], "head": [0, 1, 2]})
    delta = np.array([[[[0.001, 0.2, 0.001]]]])
    effects = xr.Dataset({"delta_loss": (("mode", "domain", "layer", "head"), delta)},
                         coords={"mode": ["zero"], "domain": ["prose"], "layer": [0], "head": [0, 1, 2]})
    labels = et.classify_heads(sink, effects, sink_threshold=0.5, effect_threshold=0.01)
    assert labels.values.ravel().tolist() == ["dormant", "active", "active"]


def test_missing_probe_is_named():
    with pytest.raises(MissingProbeError, match="'attn_received'"):
        et.sink_scores(_run())
    with pytest.raises(MissingProbeError, match="'value_norm'"):
        et.value_drain(_run())


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_run(smollm2):
    return wb.capture(smollm2, PROSE[:2], ["resid_pre", "attn_received", "value_norm"], progress=False)


def test_sink_scores_match_hf_attentions(smollm2, smollm2_run):
    order = sorted(range(2), key=lambda i: -int(smollm2_run.n_tokens[i]))
    out, _, _ = hf_forward(smollm2, [PROSE[i] for i in order])
    sink = et.sink_scores(smollm2_run)
    for row, i in enumerate(order):
        n = int(smollm2_run.n_tokens[i])
        for layer in (0, 12, 29):
            expected = out.attentions[layer][row, :, 1:n, 0].double().mean(-1).numpy()  # queries 1..n-1
            np.testing.assert_allclose(sink.isel(sample=i).sel(layer=layer).values, expected, rtol=1e-5)


def test_smollm2_shows_sinks_drains_and_massive_activations(smollm2_run):
    late = et.sink_scores(smollm2_run).sel(layer=slice(15, 28)).mean(("sample", "head"))
    assert float(late.mean()) > 0.4  # heads park much of their attention on the first token
    drain = et.value_drain(smollm2_run).ratio.sel(layer=slice(3, 28)).median()
    assert float(drain) < 0.5  # the sink's value states are small
    entries = et.massive_activations(smollm2_run)
    top = et.massive_dimensions(entries, smollm2_run.sizes["sample"])
    assert int(top.dim[0]) == 507 and float(top.sample_fraction[0]) == 1.0
    assert abs(float(top.max_value[0])) > 10_000


def test_massive_value_matches_hf_hidden_state(smollm2, smollm2_run):
    entries = et.massive_activations(smollm2_run)
    first = entries.isel(entry=0)
    i, layer, pos, dim = (int(first[k]) for k in ("sample", "layer", "pos", "dim"))
    order = sorted(range(2), key=lambda j: -int(smollm2_run.n_tokens[j]))  # the batch the capture ran
    out, _, _ = hf_forward(smollm2, [PROSE[j] for j in order])
    assert float(out.hidden_states[layer][order.index(i), pos, dim]) == float(first.value)


def test_streaming_needs_the_sink_tokens(smollm2):
    text = load_corpus()[5]["text"]
    result = et.streaming_perplexity(smollm2, text, window=32, max_tokens=160)
    loss = result.loss.to_series()
    assert loss["window"] > loss["sinks + window"] + 0.3  # dropping the sinks breaks the model
    assert loss["sinks + window"] < loss["full"] + 0.6  # keeping them stays close to full attention


def test_scaling_by_one_is_the_model_and_zero_hurts(smollm2):
    texts = domain_samples()["prose"][:2]
    sweep = et.first_token_attention_scaling(smollm2, texts, scales=(0.0, 1.0), groups={"middle": range(10, 20)})
    ids, mask = et._batch(smollm2, texts)
    base = et._mean_nll(et.token_logprobs(smollm2, ids, mask), mask)
    assert float(sweep.loss.sel(scale=1.0).squeeze()) == pytest.approx(base, abs=1e-9)
    assert float(sweep.loss.sel(scale=0.0).squeeze()) > base + 0.3


def test_massive_zero_hurts_but_random_dims_do_not(smollm2):
    texts = domain_samples()["prose"][:2]
    result = et.massive_activation_intervention(smollm2, texts, layer=3, dims=[507], n_controls=2).to_dataframe()
    assert result.loc["zero", "loss"] > result.loc["original", "loss"] + 0.5
    assert abs(result.loc["random dims zero", "loss"] - result.loc["original", "loss"]) < 0.05


def test_head_ablation_effects_shape_and_sanity(smollm2):
    texts = {d: t[:1] for d, t in domain_samples().items()}
    effects = et.head_ablation_effects(smollm2, texts, layers=[2], heads=[0, 1], max_tokens=32, progress=False)
    assert effects.delta_loss.dims == ("mode", "domain", "layer", "head")
    assert effects.delta_loss.shape == (2, 4, 1, 2) and np.isfinite(effects.delta_loss).all()
    ids, mask = et._batch(smollm2, texts["code"], 32)
    with et.ablate_heads(smollm2, {2: [1]}, mode="zero"):
        nll = et._mean_nll(et.token_logprobs(smollm2, ids, mask), mask)
    expected = nll - float(effects.base_loss.sel(domain="code"))
    # the study batches all domains together, this check only the code texts: float32 sums differ by ~1e-6
    assert float(effects.delta_loss.sel(mode="zero", domain="code", layer=2, head=1)) == pytest.approx(expected, abs=1e-5)
