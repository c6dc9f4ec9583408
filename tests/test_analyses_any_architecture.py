"""Every analysis the phenomenon modules expose runs on other architectures (smoke level).

Tiny random GPT-2 (fused Conv1D QKV, learned positions), GPT-NeoX (parallel blocks, fused
interleaved QKV) and Qwen2 (grouped KV heads, rotary): shapes, finiteness and the identities each
analysis promises (probabilities sum to one, the chain rule, scale 1 is the unchanged model, an
ensemble of one model with itself is that model, the lens at the last layer is the output).
"""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.analyses import (
    byte_baselines,
    byte_bias,
    byte_ensemble,
    byte_level,
    next_token_law,
    token_alignment,
    token_alignment_evaluation,
    tokenization_bias,
)
from workbench.analyses import extreme_tokens as et
from workbench.analyses.lens import lens_statistics, lens_summary
from workbench.corpus import paragraphs
from workbench.probes import hooks, sites
from workbench.probes.interventions import delete_layers, patch_residual, swap_layers, token_logprobs
from workbench.probes.lens import train_tuned_lens
from workbench.probes.streaming import token_windows

from .conftest import PROSE


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "qwen2"])
def handle(request):
    return wb.load_model(f"tiny-random-{request.param}")


def test_extreme_token_analyses(handle):
    run = wb.capture(handle, PROSE[:3], ["resid_pre", "attn_received", "value_norm", "resid_post"], progress=False)
    run = run.assign_coords(domain=("sample", ["prose", "prose", "code"]))
    sink = et.sink_scores(run)
    assert dict(sink.sizes) == {"sample": 3, "layer": handle.n_layers, "head": handle.n_heads}
    assert ((sink >= 0) & (sink <= 1)).all()
    by_domain = et.domain_sink_scores(run)
    np.testing.assert_allclose(by_domain.sel(domain="all"), sink.mean("sample"))
    np.testing.assert_allclose(by_domain.sel(domain="code"), sink.isel(sample=2))
    top = et.top_attended_keys(run, k=2)
    first, second = top.score.isel(rank=0), top.score.isel(rank=1)
    assert ((first >= second) | second.isnull()).all()  # NaN where a sample has fewer keys than k
    assert np.isnan(et.mean_attention_received(run, exclude_keys=(0,)).sel(key_pos=0)).all()
    drain = et.value_drain(run)
    np.testing.assert_allclose(drain.ratio, drain.sink_norm / drain.median_norm)
    entries = et.massive_activations(run, abs_threshold=0.0, ratio_threshold=1.0)
    assert (np.abs(entries.value) >= 0).all() and entries.sizes["entry"] > 0
    np.testing.assert_allclose(et.max_abs_activation(run).max("d_model"),
                               np.abs(run.resid_pre).max(["sample", "pos", "d_model"]), rtol=1e-6)
    domains = {"prose": PROSE[:2], "code": ["def f(x):\n    return x + 1\n"]}
    effects = et.head_ablation_effects(handle, domains, layers=[0], max_tokens=16, progress=False)
    assert np.isfinite(effects.delta_loss.values).all()
    labels = et.classify_heads(et.domain_sink_scores(run, include_all=False).sel(layer=[0]), effects)
    assert set(np.unique(labels.values)) <= {"dormant", "active"}
    dims = [int(np.abs(run.resid_post.sel(layer=0)).max(["sample", "pos"]).argmax("d_model"))]
    massive = et.massive_activation_intervention(handle, PROSE[:2], 0, dims, abs_threshold=0.0, n_controls=1)
    assert float(massive.kl.sel(condition="original")) == 0.0 and (massive.kl >= 0).all()
    ids, mask = et._batch(handle, PROSE[:2])
    base = et._mean_nll(token_logprobs(handle, ids, mask), mask)
    scaling = et.first_token_attention_scaling(handle, PROSE[:2], scales=(0.5, 1.0, 2.0))
    np.testing.assert_allclose(scaling.loss.sel(scale=1.0), base, rtol=1e-6)  # scale 1 changes nothing
    streaming = et.streaming_perplexity(handle, " ".join(PROSE), window=8, n_sink=2, max_tokens=48)
    np.testing.assert_allclose(streaming.perplexity, np.exp(streaming.loss))


def test_next_token_law_and_lens(handle):
    texts = paragraphs()[:4]
    pr = next_token_law.prediction_residuals(handle, texts, targets=("token_id", "one_hot"), one_hot_classes=16,
                                             max_tokens=600, progress=False)
    assert pr.pr.sizes["layer"] == handle.n_layers and np.isfinite(pr.pr.values).all() and (pr.pr > 0).all()
    fit = next_token_law.law_fit(pr.pr.sel(target="token_id", split="train"))
    assert abs(abs(float(fit.pearson_r)) - 1) < 1e-9  # two layers: the line is exact
    probes = next_token_law.future_token_probes(handle, texts, horizon=2, n_classes=16, max_tokens=600, progress=False)
    assert ((probes.accuracy >= 0) & (probes.accuracy <= 1)).all()
    run = wb.capture(handle, PROSE[:2], ["resid_post", "logits"], progress=False)
    stats = lens_statistics(run, handle)
    assert float(np.nanmax(np.abs(stats.kl_to_final.sel(layer=handle.n_layers - 1).values))) < 1e-5
    assert lens_summary(stats).sizes["layer"] == handle.n_layers
    windows = token_windows(handle, texts, 64, max_tokens=400)
    lens = train_tuned_lens(handle, windows, max_tokens=200, steps=2, batch_tokens=16, progress=False)
    tuned = lens_statistics(run, handle, lens)
    assert float(np.nanmax(np.abs(tuned.kl_to_final.sel(layer=handle.n_layers - 1).values))) < 1e-5


def test_byte_level_analyses(handle):
    model = byte_level.ByteLevelModel(handle, max_hypotheses=8)
    dist = model.next_byte_distribution("The ca")
    assert dist.sizes["byte"] == 256 and abs(float(dist.sum()) - 1) < 1e-6
    stream = model.stream("Hi cat", progress=False)
    chain = float(stream.logprob.sum())  # sum_i log P(byte i | bytes < i)
    assert abs(chain - model.prefix_logprob("Hi cat")) < 1e-4 * abs(chain)
    step = byte_level.ByteLevelModel(handle, max_hypotheses=8).stream("Hi cat", progress=False, lookahead=False)
    np.testing.assert_allclose(stream.probability, step.probability, atol=1e-6)  # scoring ahead changes no number
    assert (stream.n_tokenizations.values == step.n_tokenizations.values).all()
    for baseline in (byte_baselines.naive_next_byte_distribution, byte_baselines.token_healing_next_byte_distribution):
        assert abs(float(baseline(handle, "The ca").sum()) - 1) < 1e-6
    assert byte_ensemble.bits_per_byte(model, "Hi cat") == pytest.approx(-model.prefix_logprob("Hi cat") / np.log(2) / 6,
                                                                       rel=1e-3)
    same = byte_ensemble.ByteLevelEnsemble([model, byte_level.ByteLevelModel(handle, max_hypotheses=8)])
    np.testing.assert_allclose(same.next_byte_distribution("Hi"), model.next_byte_distribution("Hi"), atol=1e-9)
    ends = byte_bias.canonical_token_ends(handle, "Hi cat")
    assert (np.diff(ends) > 0).all() and ends[-1] == len(b"Hi cat")
    compared = byte_bias.compare_next_byte(model, "The ca")
    np.testing.assert_allclose(compared.probability.sum("byte"), 1, atol=1e-6)
    covers = byte_bias.cover_encodings(model, "The ca", top=3)
    assert (np.diff(covers.logprob) <= 0).all()
    bias = byte_bias.bias_along_text(model, "Hi cat", progress=False)
    assert (bias.total_variation >= 0).all() and (bias.total_variation <= 1 + 1e-9).all()
    cuts = byte_bias.prompt_cut_invariance(model, "Hi cat", cuts=[2, 4])
    assert np.isfinite(cuts.exact_logprob).all()
    bpb = byte_bias.ensemble_bits_per_byte([handle, handle], ["Hi cat"], "The dog", weight_step=0.5, progress=False,
                                           max_hypotheses=4)
    assert np.isfinite(bpb.bits_per_byte).all()
    for estimate in (tokenization_bias.naive_transitions, tokenization_bias.exact_transitions):
        np.testing.assert_allclose(estimate(handle, ["ab"], ["a", "b"]).probability.sum("next_char"), 1)


def test_token_alignment_analyses(handle):
    prompt = "The cat sat on the ma"
    plain = token_alignment.plain_completion(handle, prompt, max_new_tokens=3)
    assert "".join(plain.tokens).encode() == plain.data
    aligned = token_alignment.aligned_completion(handle, prompt, max_new_tokens=3, back_off=1)
    assert "".join(aligned.tokens).encode() == aligned.dropped + aligned.data  # re-spells what it backed off
    score = token_alignment.continuation_logprob(handle, prompt, "t", back_off=1)
    assert np.isfinite(score.logprob) and score.logprob <= 0
    cuts = token_alignment_evaluation.sample_cuts(paragraphs()[:3], n_prompts=2, seed=0)
    assert len(cuts) == 2


def test_layer_interventions(handle):
    ids = torch.tensor([handle.tokenizer(PROSE[0])["input_ids"]])
    base = token_logprobs(handle, ids)
    got = {}
    hooks.forward(handle, ids, reads=[(sites.RESID_PRE, 0)], on_site=lambda s, l, x: got.__setitem__("h", x.clone()))
    with delete_layers(handle, range(handle.n_layers)):
        deleted = token_logprobs(handle, ids)
    # every block skipped: the output is unembed(embeddings), computed here directly
    direct = torch.log_softmax(handle.sites.unembed(got["h"])[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(deleted, direct, rtol=1e-5, atol=1e-5)
    with swap_layers(handle, 0):
        swapped = token_logprobs(handle, ids)
    assert not torch.allclose(swapped, base)
    torch.testing.assert_close(token_logprobs(handle, ids), base, rtol=0, atol=0)  # blocks put back
    # patching block 1's input with the embeddings = deleting block 0
    with patch_residual(handle, 1, got["h"]):
        patched = token_logprobs(handle, ids)
    with delete_layers(handle, [0]):
        torch.testing.assert_close(patched, token_logprobs(handle, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_naive_stream_reuses_the_cache_and_equals_one_call_per_cut(arch):
    handle = wb.load_model(f"tiny-random-{arch}")
    text = "The cat sat on the mat, then the dog."  # longer than the tiny Gemma's sliding window of 4 tokens
    stream = byte_baselines.naive_next_byte_stream(handle, text)
    for cut in range(0, len(text), 5):
        one = byte_baselines.naive_next_byte_distribution(handle, text[:cut])
        np.testing.assert_allclose(stream.probability.sel(cut=cut), one, rtol=1e-4, atol=1e-7)
    assert int(stream.tokens_run.sum()) < sum(len(handle.tokenizer(text[:c])["input_ids"]) for c in range(len(text)))


def test_tokenizer_diagnostics(handle):
    """Loss per byte equals Hugging Face's own loss; indicators and verification run through the site map
    (verification probabilities equal a plain forward pass); a canonical spelling's cosine with itself is 1."""
    from workbench.analyses.boundary_artifacts import noncanonical_tokenizations
    from workbench.analyses.tokenizer_fairness import loss_per_byte
    from workbench.analyses.undertrained_tokens import (
        candidates, repeat_prompts, token_categories, verify_tokens, weight_indicators)

    texts = ["The cat sat on the mat.", "Le café est fermé."]
    out = loss_per_byte(handle, texts)
    for i, text in enumerate(texts):
        ids = torch.tensor([out.attrs["start_tokens"] + handle.tokenizer.encode(text, add_special_tokens=False)])
        labels = ids.clone()
        labels[0, : len(out.attrs["start_tokens"])] = -100
        with torch.no_grad():
            nll = float(handle.hf_model(input_ids=ids, labels=labels).loss) * (ids.shape[1] - len(out.attrs["start_tokens"]))
        assert float(out.nats[i]) == pytest.approx(nll, rel=1e-4)
    cats = token_categories(handle.tokenizer)
    ind = weight_indicators(handle, cats)
    cands = candidates(cats, ind[ind.attrs["primary"]], 0.0001)
    verified = verify_tokens(handle, cands[:3])
    prompt = repeat_prompts(handle)[1]
    with torch.no_grad():
        p = torch.softmax(handle.hf_model(input_ids=torch.tensor([prompt.ids(cands[0])])).logits[0, -1].float(), -1)
    assert float(verified.probability.sel(prompt=prompt.name)[0]) == pytest.approx(float(p[cands[0]]), abs=1e-6)
    spellings = noncanonical_tokenizations(handle, "The weather is", " nice", limit=4)
    np.testing.assert_allclose(spellings.cosine.values[0], 1.0, atol=1e-6)
    assert spellings.sizes["layer"] == handle.n_layers and np.isfinite(spellings.logprob.values).all()


def test_geometry_and_update_analyses(handle):
    """Token geometry, update statistics, tokenwise fits and the deletion / swap sweep on other architectures."""
    from workbench.analyses import layer_stages, layer_updates, token_geometry

    windows = [list(np.random.default_rng(i).integers(5, 400, 24)) for i in range(3)]
    run = wb.capture(handle, windows, ["resid_pre", "resid_post", "logits"], progress=False)
    geometry = token_geometry.token_geometry(run, max_rank=8, progress=False)
    assert np.isfinite(geometry.id.sel(depth=slice(1, None))).all()
    assert ((geometry.overlap.isel(depth=slice(0, -1)) >= 0) & (geometry.overlap.isel(depth=slice(0, -1)) <= 1)).all()
    stats = layer_updates.update_statistics(run)
    np.testing.assert_allclose(stats.update_norm.isel(sample=0, pos=0),
                               np.linalg.norm(run.resid_post.values[0, 0] - run.resid_pre.values[0, 0], axis=-1), rtol=1e-5)
    fits, fit = layer_updates.tokenwise_fit(run, ranks=(4,), progress=False)
    assert np.isfinite(fits.r2).all()
    effect = layer_updates.fit_residual_effect(handle, torch.tensor(windows[:1]), None, fit, progress=False)
    assert effect.sizes["layer"] == handle.n_layers and (effect.mean_kl >= 0).all()
    sweep = layer_stages.layer_intervention_sweep(handle, torch.tensor(windows), progress=False)
    assert sweep.sizes["intervention"] == 2 * handle.n_layers - 1 and ((sweep.top1_retention >= 0) & (sweep.top1_retention <= 1)).all()
