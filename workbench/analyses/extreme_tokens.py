"""Extreme-token phenomena: attention sinks, value-state drains, residual-state peaks,
massive activations, active/dormant heads, and the interventions that test them.

Papers: "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token
Phenomena in LLMs" (Guo et al., 2024); "Massive Activations in Large Language Models"
(Sun et al., 2024); "Efficient Streaming Language Models with Attention Sinks" (Xiao
et al., 2023); "ZeroTuning" (initial-token attention); "When Attention Sink Emerges in
Language Models" (Gu et al., 2024) for the sink-rate threshold.

Functions of a run need only its probes; the intervention functions also take a model
handle because they run fresh forward passes (through :mod:`workbench.probes.interventions`).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..models import ModelHandle
from ..numerics import entropy_from_probs, kl_from_logprobs
from ..probes.hooks import forward
from ..probes.sites import RESID_POST
from ..probes.interventions import (
    ablate_heads,
    edit_residual,
    scale_first_token_attention,
    sliding_window_mask,
    token_logprobs,
)
from .common import require
from .residual_norms import residual_norm_peaks

# --------------------------------------------------------------------------- attention sinks


def sink_scores(run: xr.Dataset, key_pos: int = 0) -> xr.DataArray:
    """Attention-sink score of every head: mean attention the sink key gets from later queries.

    Guo et al. (2024): ``sink[s, l, h] = mean_{q > k0} A^{l,h}[q, k0]`` with ``k0 = key_pos``
    (the first token by default). Needs the ``attn_received`` probe.
    Dims: (sample, layer, head, key_pos) -> (sample, layer, head).
    """
    received = require(run, "attn_received")
    if not 0 <= key_pos < run.sizes["key_pos"]:
        raise IndexError(f"key_pos {key_pos} is out of range 0..{run.sizes['key_pos'] - 1}.")
    score = received.sel(key_pos=key_pos, drop=True)
    score.name = "sink_score"
    return score


def top_attended_keys(run: xr.Dataset, k: int = 3) -> xr.Dataset:
    """The ``k`` keys each head attends to most (mean over later queries), with their tokens.

    Finds sinks beyond the first token (delimiters, newlines). Keys with fewer than 4 later
    queries are left out: a mean over one or two queries is not a sink.
    Dims: -> key_pos_rank (sample, layer, head, rank), score, token.
    """
    received = require(run, "attn_received")
    later = run["n_tokens"] - 1 - run["key_pos"]  # number of later queries
    values = received.where(later >= 4).fillna(-1.0)
    order = np.argsort(-values.values, axis=-1, kind="stable")[..., :k]
    scores = np.take_along_axis(values.values, order, axis=-1)
    tokens = np.take_along_axis(
        run["token"].values[:, None, None, :].repeat(values.sizes["layer"], 1).repeat(values.sizes["head"], 2), order, -1
    )
    dims = ("sample", "layer", "head", "rank")
    coords = {d: run[d].values for d in dims[:3]}
    return xr.Dataset(
        {"key": (dims, order), "score": (dims, np.where(scores < 0, np.nan, scores)), "token": (dims, tokens)},
        coords={**coords, "rank": np.arange(k)},
    )


def sink_rate(run: xr.Dataset, threshold: float = 0.3) -> xr.DataArray:
    """Fraction of heads in each layer for which a key is a sink (mean received attention > threshold).

    Gu et al. (2024) count a head as sinking on key k when its attention to k exceeds
    ``threshold`` (0.3). Dims: -> (sample, layer, key_pos).
    """
    received = require(run, "attn_received")
    rate = (received > threshold).where(received.notnull()).mean("head")
    rate.name = "sink_rate"
    return rate


def domain_sink_scores(run: xr.Dataset, key_pos: int = 0, include_all: bool = True) -> xr.DataArray:
    """Mean sink score of every head per input domain (and over all samples as domain ``"all"``).

    Guo et al. (2024): a head is dormant on a domain when it parks its attention on the sink
    there. ``score[d, l, h] = mean over samples of domain d of sink[s, l, h]`` (:func:`sink_scores`).
    Dims: (sample, layer, head, key_pos) -> (domain, layer, head). Without a ``domain``
    coordinate only ``"all"`` is returned.
    """
    sink = sink_scores(run, key_pos)
    parts = []
    if include_all or "domain" not in run.coords:
        parts.append(sink.mean("sample").expand_dims(domain=["all"]))
    if "domain" in run.coords:
        by_domain = sink.groupby("domain").mean()
        parts.append(by_domain.assign_coords(domain=by_domain["domain"].astype(str)))
    out = xr.concat(parts, dim="domain")
    out.name = "sink_score"
    return out


def received_by_key(run: xr.Dataset, sample: int, layer: int) -> xr.DataArray:
    """Attention each key of one sample receives at one layer, mean over heads. Dims: -> (key_pos,)."""
    return require(run, "attn_received").isel(sample=sample).sel(layer=layer).mean("head")


def mean_attention_received(run: xr.Dataset, exclude_keys: tuple[int, ...] = ()) -> xr.DataArray:
    """Mean over heads and samples of the attention each key position receives.

    ``exclude_keys`` drops positions (e.g. the sink at 0) from the result, as the
    explorer's "exclude sinks" toggle does. Dims: -> (layer, key_pos).
    """
    received = require(run, "attn_received").mean(("sample", "head"))
    if exclude_keys:
        received = received.where(~received["key_pos"].isin(list(exclude_keys)))
    return received


# --------------------------------------------------------------------------- value drains


def value_drain(run: xr.Dataset, sink_pos: int = 0) -> xr.Dataset:
    """Value-state drains: the sink's value norm relative to the median token's, per head.

    Guo et al. (2024): ``ratio[s, l, h] = ||v_{k0} W_O^h|| / median_j ||v_j W_O^h||``
    over valid tokens j. Drains show ratios well below 1. Needs ``value_norm``.
    Dims: (sample, layer, head, pos) -> sink_norm, median_norm, ratio (sample, layer, head).
    """
    norms = require(run, "value_norm").where(run["valid"])
    sink = norms.isel(pos=sink_pos, drop=True).reset_coords(drop=True)
    median = norms.median("pos", skipna=True)
    return xr.Dataset({"sink_norm": sink, "median_norm": median, "ratio": sink / median})


# --------------------------------------------------------------------------- residual peaks


def residual_peak_span(run: xr.Dataset, min_ratio: float = 10.0, pos: int = 0, variable: str = "resid_pre") -> xr.Dataset:
    """Where the residual-state peak of token ``pos`` appears and where it fades, per sample.

    Ratio = the token's residual norm / the median token's (Guo et al., 2024).
    ``appears`` = first layer with ratio >= min_ratio; ``fades`` = first later layer where
    it falls below again (-1 if it never appears or never fades); ``max_ratio`` and its layer.
    Dims: -> (sample,).
    """
    ratio = residual_norm_peaks(run, variable)["ratio_to_median"].isel(pos=pos, drop=True).reset_coords(drop=True)
    above = (ratio >= min_ratio).values  # (sample, layer)
    appears, fades = [], []
    for row in above:
        first = int(np.argmax(row)) if row.any() else -1
        after = np.nonzero(~row[first:])[0] if first >= 0 else []
        appears.append(first)
        fades.append(int(first + after[0]) if len(after) else -1)
    return xr.Dataset(
        {
            "appears": ("sample", np.array(appears)),
            "fades": ("sample", np.array(fades)),
            "max_ratio": ratio.max("layer"),
            "max_layer": ratio.argmax("layer"),
        },
        coords={"sample": run["sample"].values},
    )


# --------------------------------------------------------------------------- massive activations


def massive_activations(
    run: xr.Dataset, variable: str = "resid_pre", abs_threshold: float = 100.0, ratio_threshold: float = 1000.0
) -> xr.Dataset:
    """Hidden-state entries that are massive: |a| > abs_threshold and > ratio_threshold x median |a|.

    Sun et al. (2024): the median is over the whole hidden state of that layer and
    sample (valid positions x d_model). Returns one row per entry along dim ``entry``:
    sample, layer, pos, dim, token, value, ratio (sorted by |value|, largest first).
    A lazy (dask-backed) run is read one block of samples at a time (its chunk along
    ``sample``), so memory stays bounded by one block whatever the run's size.
    """
    hidden = require(run, variable).transpose("sample", "layer", "pos", "d_model")
    valid_all = run["valid"].values
    step = int(hidden.chunks[0][0]) if hidden.chunks is not None else hidden.sizes["sample"]  # dims: sample first
    found, medians = [], []
    for a in range(0, hidden.sizes["sample"], step):
        block = hidden.isel(sample=slice(a, a + step)).values
        for i, values in enumerate(block, start=a):  # one sample at a time: (layer, pos, d_model)
            magnitude = np.abs(values[:, valid_all[i]])  # valid positions only
            median = np.median(magnitude.reshape(magnitude.shape[0], -1), axis=-1)  # (layer,)
            hit = (magnitude > abs_threshold) & (magnitude > ratio_threshold * median[:, None, None])
            layer, p, d = np.nonzero(hit)
            p = np.flatnonzero(valid_all[i])[p]
            found.append((np.full(len(layer), i), layer, p, d, values[layer, p, d]))
            medians.append(median)
    median = np.stack(medians)  # (sample, layer)
    s, layer, p, d, value = (np.concatenate(parts) for parts in zip(*found))
    order = np.argsort(-np.abs(value), kind="stable")
    s, layer, p, d, value = s[order], layer[order], p[order], d[order], value[order]
    return xr.Dataset(
        {
            "sample": ("entry", s),
            "layer": ("entry", run["layer"].values[layer]),
            "pos": ("entry", p),
            "dim": ("entry", d),
            "token": ("entry", run["token"].values[s, p]),
            "value": ("entry", value),
            "ratio": ("entry", np.abs(value) / median[s, layer]),
        },
        attrs={"variable": variable, "abs_threshold": abs_threshold, "ratio_threshold": ratio_threshold},
    )


def max_abs_activation(run: xr.Dataset, variable: str = "resid_pre") -> xr.DataArray:
    """Largest |a| of each feature dimension per layer, over samples and valid positions.

    The massive-activation map of Sun et al. (2024). Dims: -> (layer, d_model).
    """
    hidden = require(run, variable)
    result = np.abs(hidden).where(run["valid"]).max(("sample", "pos"))
    result.name = "max_abs_activation"
    return result


def massive_dimensions(entries: xr.Dataset, n_samples: int) -> xr.Dataset:
    """Per feature dimension: in how many samples it is massive, its largest |value| and tokens.

    Sun et al. find massive activations at the same few dimensions for every input; a
    dimension massive in every sample has ``sample_fraction`` 1. Dims: -> (dim,).
    """
    dims = np.unique(entries["dim"].values)
    fraction, top, layers, tokens = [], [], [], []
    for d in dims:
        rows = entries["dim"].values == d
        fraction.append(len(np.unique(entries["sample"].values[rows])) / n_samples)
        top.append(float(entries["value"].values[rows][np.argmax(np.abs(entries["value"].values[rows]))]))
        layers.append(f"{entries['layer'].values[rows].min()}-{entries['layer'].values[rows].max()}")
        tokens.append(", ".join(sorted(set(map(str, entries["token"].values[rows])))[:5]))
    return xr.Dataset(
        {
            "sample_fraction": ("dim", np.array(fraction)),
            "max_value": ("dim", np.array(top)),
            "layers": ("dim", np.array(layers, dtype=str)),
            "tokens": ("dim", np.array(tokens, dtype=str)),
        },
        coords={"dim": dims},
    ).sortby("sample_fraction", ascending=False)


# --------------------------------------------------------------------------- forward-pass helpers


def _batch(handle: ModelHandle, texts: list[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and padding mask for ``texts`` (each cut to ``max_tokens``)."""
    encoded = [handle.tokenizer(t)["input_ids"][:max_tokens] for t in texts]
    if not encoded or min(map(len, encoded)) < 2:
        raise ValueError("every text needs at least two tokens to score next-token loss.")
    width = max(map(len, encoded))
    pad = handle.tokenizer.pad_token_id or 0
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    return ids, mask


def _mean_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over real (non-padding) targets."""
    target_valid = mask[:, 1:].bool()
    return float(-logprobs[target_valid].double().mean())


# --------------------------------------------------------------------------- active / dormant heads


def head_ablation_effects(
    handle: ModelHandle,
    texts_by_domain: dict[str, list[str]],
    layers=None,
    heads=None,
    modes=("zero", "sink"),
    max_tokens: int = 64,
    progress: bool = True,
) -> xr.Dataset:
    """Loss change when each head is zero-ablated, or its attention moved onto the sink, per domain.

    Guo et al. (2024): a dormant head parks its attention on the sink and writes almost
    nothing, so removing it leaves the loss unchanged. ``delta_loss[m, d, l, h] =
    NLL(with head h of layer l under intervention m) - NLL(model)`` in nats/token,
    averaged over the domain's texts (each cut to its first ``max_tokens`` tokens; all
    domains share one batch, so each intervention is one forward pass).
    Dims: -> (mode, domain, layer, head), plus ``base_loss`` (domain).
    """
    from tqdm.auto import tqdm

    layers = list(range(handle.n_layers)) if layers is None else list(layers)
    heads = list(range(handle.n_heads)) if heads is None else list(heads)
    domains = list(texts_by_domain)
    texts = [t for d in domains for t in texts_by_domain[d]]
    rows = np.repeat(np.arange(len(domains)), [len(texts_by_domain[d]) for d in domains])
    ids, mask = _batch(handle, texts, max_tokens)

    def per_domain_nll() -> np.ndarray:
        logprobs = token_logprobs(handle, ids, mask)
        return np.array([_mean_nll(logprobs[rows == d], mask[rows == d]) for d in range(len(domains))])

    base = per_domain_nll()
    delta = np.full((len(modes), len(domains), len(layers), len(heads)), np.nan)
    bar = tqdm(total=len(modes) * len(layers) * len(heads), desc="head ablations", disable=not progress)
    for mi, mode in enumerate(modes):
        for li, layer in enumerate(layers):
            for hi, head in enumerate(heads):
                with ablate_heads(handle, {layer: [head]}, mode=mode):
                    delta[mi, :, li, hi] = per_domain_nll() - base
                bar.update()
    bar.close()
    return xr.Dataset(
        {"delta_loss": (("mode", "domain", "layer", "head"), delta), "base_loss": ("domain", base)},
        coords={"mode": list(modes), "domain": domains, "layer": layers, "head": heads},
        attrs={"max_tokens": max_tokens},
    )


def classify_heads(
    sink: xr.DataArray, effects: xr.Dataset, sink_threshold: float = 0.5, effect_threshold: float = 0.01
) -> xr.DataArray:
    """Label each head ``dormant`` or ``active`` on each domain.

    Rule (after Guo et al., 2024): *dormant* when its mean sink score on the domain is at
    least ``sink_threshold`` AND zero-ablating it changes the loss by less than
    ``effect_threshold`` nats/token; otherwise *active* (it looks past the sink, or what it
    writes matters). ``sink``: (domain, layer, head) mean sink scores, e.g.
    ``sink_scores(run).groupby("domain").mean()``. Dims: -> (domain, layer, head).
    """
    zero = effects["delta_loss"].sel(mode="zero")
    sink = sink.sel(layer=zero["layer"], head=zero["head"], domain=zero["domain"])
    dormant = (sink >= sink_threshold) & (np.abs(zero) < effect_threshold)
    label = xr.where(dormant, "dormant", "active")
    label.name = "head_state"
    label.attrs.update(sink_threshold=sink_threshold, effect_threshold=effect_threshold)
    return label


# --------------------------------------------------------------------------- interventions


def massive_activation_intervention(
    handle: ModelHandle,
    texts: list[str],
    layer: int,
    dims: list[int],
    abs_threshold: float = 100.0,
    mean_values: dict[int, float] | None = None,
    n_controls: int = 5,
    seed: int = 0,
) -> xr.Dataset:
    """Loss and KL to the original model when the massive activations are zeroed or set to their mean.

    Sun et al. (2024): at ``layer`` (where they appear), entries of ``dims`` with
    |a| > abs_threshold are set to 0 (``zero``) or to their mean over the texts
    (``mean``, or ``mean_values`` if given). Control: the same entries' positions in
    ``len(dims)`` random other dimensions set to 0, ``n_controls`` times (seeded).
    Returns mean NLL (nats/token) and mean KL(original || edited) per condition
    along dim ``condition``.
    """
    ids, mask = _batch(handle, texts)
    valid_targets = mask[:, 1:].bool()
    leaving = {}
    out = forward(handle, ids, mask, reads=[(RESID_POST, layer)], on_site=lambda s, l, h: leaving.__setitem__("h", h.clone()))
    reference = torch.log_softmax(out.logits.float(), -1)
    hidden = leaving["h"]
    dims_t = torch.tensor(dims)
    where = (hidden[..., dims_t].abs() > abs_threshold) & mask.bool()[..., None]  # (b, p, len(dims))
    if not where.any():
        raise ValueError(f"no entry of dims {dims} exceeds {abs_threshold} at layer {layer}; pick the layer where they appear.")
    if mean_values is None:
        mean_values = {d: float(hidden[..., d][where[..., i]].mean()) for i, d in enumerate(dims)}

    def setter(target_dims, values):
        def edit(h):
            for i, d in enumerate(target_dims):
                h[..., d] = torch.where(where[..., i], torch.as_tensor(values[i], dtype=h.dtype), h[..., d])
            return h

        return edit

    def score(edit) -> tuple[float, float]:
        with edit_residual(handle, layer, edit):
            logits = forward(handle, ids, mask).logits
        edited = torch.log_softmax(logits.float(), -1)
        nll = -edited[:, :-1].gather(-1, ids[:, 1:, None])[..., 0][valid_targets].double().mean()
        kl = kl_from_logprobs(reference, edited)[mask.bool()].double().mean()
        return float(nll), float(kl)

    base_nll = _mean_nll(reference[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], mask)
    conditions = {"original": (base_nll, 0.0)}
    conditions["zero"] = score(setter(dims, [0.0] * len(dims)))
    conditions["mean"] = score(setter(dims, [mean_values[d] for d in dims]))
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(handle.d_model), dims)
    controls = [score(setter(list(rng.choice(others, len(dims), replace=False)), [0.0] * len(dims)))
                for _ in range(n_controls)]
    conditions["random dims zero"] = tuple(np.mean(controls, axis=0))
    names = list(conditions)
    return xr.Dataset(
        {
            "loss": ("condition", [conditions[n][0] for n in names]),
            "kl": ("condition", [conditions[n][1] for n in names]),
        },
        coords={"condition": names},
        attrs={"layer": layer, "dims": list(map(int, dims)), "abs_threshold": abs_threshold,
               "n_entries": int(where.sum()), "mean_values": str({int(k): round(v, 2) for k, v in mean_values.items()})},
    )


def attention_entropy(attentions, mask: torch.Tensor, layers) -> float:
    """Mean entropy (nats) of the attention rows of real queries > 0 in ``layers``, all heads."""
    values = []
    for layer in layers:
        a = attentions[layer].double()  # (b, h, q, k)
        ent = entropy_from_probs(a)  # (b, h, q)
        keep = mask.bool().clone()
        keep[:, 0] = False
        values.append(ent.permute(0, 2, 1)[keep].mean())
    return float(torch.stack(values).mean())


def first_token_attention_scaling(
    handle: ModelHandle, texts: list[str], scales=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0), groups: dict | None = None
) -> xr.Dataset:
    """ZeroTuning-style sweep: scale the attention to the first token in a group of layers.

    For each layer group (default: early, middle, late thirds) and scale ``s``, every
    query's attention to key 0 in those layers is multiplied by ``s`` and renormalised.
    Reports mean NLL (nats/token) and mean attention entropy of the scaled layers.
    Dims: -> loss, entropy (group, scale).
    """
    if groups is None:
        thirds = np.array_split(np.arange(handle.n_layers), 3)
        groups = {name: [int(x) for x in part] for name, part in zip(("early", "middle", "late"), thirds) if len(part)}
    ids, mask = _batch(handle, texts)
    loss = np.zeros((len(groups), len(scales)))
    entropy = np.zeros_like(loss)
    for gi, layers in enumerate(groups.values()):
        for si, scale in enumerate(scales):
            with scale_first_token_attention(handle, layers, scale):
                logprobs, attentions = token_logprobs(handle, ids, mask, output_attentions=True)
            loss[gi, si] = _mean_nll(logprobs, mask)
            entropy[gi, si] = attention_entropy(attentions, mask, layers)
    return xr.Dataset(
        {"loss": (("group", "scale"), loss), "entropy": (("group", "scale"), entropy)},
        coords={"group": list(groups), "scale": list(scales),
                "layers": ("group", [f"{min(g)}-{max(g)}" for g in groups.values()])},
    )


def streaming_perplexity(
    handle: ModelHandle, text: str, window: int = 64, n_sink: int = 4, max_tokens: int = 512
) -> xr.Dataset:
    """StreamingLLM (Xiao et al.): next-token loss beyond the window with and without sink tokens.

    Conditions: ``full`` attention; ``window`` (each query sees the last ``window`` keys);
    ``sinks + window`` (also the first ``n_sink`` keys). Loss is averaged over targets at
    positions >= window, where the conditions differ. Dims: -> loss, perplexity (condition).
    """
    ids = torch.tensor([handle.tokenizer(text)["input_ids"][:max_tokens]])
    n = ids.shape[1]
    if n <= window + 1:
        raise ValueError(f"the text has {n} tokens; it needs more than window + 1 = {window + 1} to test beyond the window.")
    conditions = {"full": None, "window": sliding_window_mask(n, window, 0), "sinks + window": sliding_window_mask(n, window, n_sink)}
    loss = []
    for mask in conditions.values():
        logprobs = token_logprobs(handle, ids, mask)
        loss.append(float(-logprobs[0, window - 1 :].double().mean()))  # targets at positions >= window
    return xr.Dataset(
        {"loss": ("condition", loss), "perplexity": ("condition", np.exp(loss))},
        coords={"condition": list(conditions)},
        attrs={"window": window, "n_sink": n_sink, "n_tokens": n},
    )
