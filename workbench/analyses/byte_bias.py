"""Where tokenization bias bites on real text, and what exact byte-level models gain in an ensemble.

Papers: "Understanding and Mitigating Tokenization Bias in Language Models" and "Exact
Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles"
(Phan et al., 2024). The exact next-byte distribution ``P(b | x) = P(x b) / P(x)``, with
``P(x)`` summed over the cover encodings of ``x`` (Byte-Token Representation Lemma), is
computed by :class:`~workbench.analyses.byte_level.ByteLevelModel`; the two baselines it is
compared with, the naive distribution (prompt with ``encode(x)``, collapse the next token
onto its first byte) and token healing (back off the last token, constrain the next one to
its bytes), by :func:`~workbench.analyses.byte_baselines.naive_next_byte_distribution` and
:func:`~workbench.analyses.byte_baselines.token_healing_next_byte_distribution`. This module
applies them along real text and across models; it defines no new estimate.

- :func:`compare_next_byte`: the three distributions at one cut, with their distances.
- :func:`bias_along_text`: the same at every byte cut of a text, labelled with whether the
  cut falls on a token boundary of the canonical encoding, after a space, or inside a UTF-8
  character.
- :func:`cover_encodings`: the cover encodings of a prefix and their share of ``P(x)``.
- :func:`prompt_cut_invariance`: ``log P(text)`` read as prompt + continuation for every
  place the prompt could end: the exact reading does not depend on the cut, the naive
  token-level one does.
- :func:`ensemble_bits_per_byte`: bits per byte of each model, and of their mixture in byte
  space (:class:`~workbench.analyses.byte_ensemble.ByteLevelEnsemble`), on held-out text.

Pure functions: model handles (or :class:`ByteLevelModel` objects) and texts in, labelled
Datasets out; no files, no plots.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from ..models import ModelHandle
from ..probes.token_scoring import sequence_logprobs
from ..tokenization.vocab_bytes import printable_byte, vocab_bytes
from .byte_baselines import (
    kl_divergence,
    naive_next_byte_distribution,
    token_healing_next_byte_distribution,
    total_variation,
)
from .byte_ensemble import ByteLevelEnsemble, mixture_logprob, weight_grid
from .byte_level import BYTE_CHARS, BYTES, ByteLevelModel

__all__ = [
    "BASELINES",
    "ESTIMATES",
    "bias_along_text",
    "canonical_token_ends",
    "compare_next_byte",
    "cover_encodings",
    "ensemble_bits_per_byte",
    "mixture_logprob",
    "prompt_cut_invariance",
    "weight_grid",
]

ESTIMATES = ("exact", "naive", "token_healing")
BASELINES = ("naive", "token_healing")
PAPER = ("Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles "
         "(Phan et al., 2024)")
_WHITESPACE = frozenset(b" \t\n\r")


# --------------------------------------------------------------------------- helpers


def _as_byte_model(model, **model_kwargs) -> ByteLevelModel:
    if isinstance(model, ByteLevelModel):
        if model_kwargs:
            raise TypeError(f"{sorted(model_kwargs)} only apply when a ModelHandle is passed, not a ByteLevelModel.")
        return model
    if isinstance(model, ModelHandle):
        return ByteLevelModel(model, **model_kwargs)
    raise TypeError(f"expected a ModelHandle or a ByteLevelModel, got {type(model).__name__}.")


def _text_bytes(text) -> bytes:
    """UTF-8 bytes of a real text (str, or bytes that decode as UTF-8): the canonical encoding needs a string."""
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the text is not valid UTF-8 (byte {err.start}); pass a str or UTF-8 bytes.") from None
    else:
        raise TypeError(f"text must be str or bytes, got {type(text).__name__}.")
    if not data:
        raise ValueError("the text is empty; pass at least one character.")
    return data


def _encode(handle: ModelHandle, text: str) -> list[int]:
    """The tokenizer's canonical encoding of ``text``, special-token strings read as text (as in byte_level)."""
    return list(handle.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def canonical_token_ends(handle: ModelHandle, text) -> np.ndarray:
    """Byte offsets where each token of the canonical encoding of ``text`` ends.

    ``ends[k] = sum_{j <= k} len(bytes(t_j))`` for ``encode(text) = t_1..t_m``; a cut ``i`` of the
    text is at a token boundary when ``i = 0`` or ``i`` is in ``ends``. Dims: text -> (token,).
    """
    data = _text_bytes(text)
    vocab = vocab_bytes(handle.tokenizer)
    ids = _encode(handle, data.decode("utf-8"))
    lengths = [len(vocab.token_bytes[t] or b"") for t in ids]
    ends = np.cumsum(lengths, dtype=np.int64)
    if not len(ends) or ends[-1] != len(data):
        raise ValueError(f"{handle.name}: the tokens of the canonical encoding spell {int(ends[-1]) if len(ends) else 0} "
                         f"bytes, not the text's {len(data)}; this tokenizer rewrites text and has no byte reading.")
    return ends


def _distances(probability: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """TV and KL(exact || baseline) of each baseline against ``estimate="exact"``; dims (..., baseline)."""
    exact = probability.sel(estimate="exact", drop=True)
    baselines = probability.sel(estimate=list(BASELINES)).rename(estimate="baseline")
    return total_variation(baselines, exact), kl_divergence(exact, baselines)


# --------------------------------------------------------------------------- one cut


def compare_next_byte(model, prefix, **model_kwargs) -> xr.Dataset:
    """Exact, naive and token-healed next-byte distributions after ``prefix``, and how far each baseline is off.

    "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
    Ensembles" (Phan et al., 2024): the exact ``P(b | x) = P(x b) / P(x)`` (cover encodings)
    against the naive and token-healing baselines, all conditioned on the same start context.
    ``total_variation[baseline] = 1/2 sum_b |P_baseline(b | x) - P_exact(b | x)|``;
    ``kl_divergence[baseline] = sum_b P_exact(b | x) log(P_exact(b | x) / P_baseline(b | x))`` (nats).

    ``model``: a ModelHandle (a ByteLevelModel is built with ``model_kwargs``) or a ByteLevelModel
    (reused, so its states are too). Three model passes for the baselines, plus the exact walk.
    Dims: -> ``probability`` (estimate, byte); ``total_variation``, ``kl_divergence`` (baseline).
    """
    byte_model = _as_byte_model(model, **model_kwargs)
    exact = byte_model.next_byte_distribution(prefix)
    context = byte_model.context_ids
    naive = naive_next_byte_distribution(byte_model.handle, prefix, context)
    healed = token_healing_next_byte_distribution(byte_model.handle, prefix, context)
    probability = xr.concat([d.drop_attrs() for d in (exact, naive, healed)], dim="estimate").assign_coords(
        estimate=list(ESTIMATES))
    tv, kl = _distances(probability)
    return xr.Dataset(
        {"probability": probability, "total_variation": tv, "kl_divergence": kl},
        attrs={
            "model": byte_model.name,
            "prefix": exact.attrs["prefix"],
            "prefix_bytes": exact.attrs["prefix_bytes"],
            "prefix_logprob": exact.attrs["prefix_logprob"],
            "p_end_of_text": exact.attrs["p_end_of_text"],
            "n_tokenizations": exact.attrs["n_tokenizations"],
            "n_prompt_tokens": naive.attrs["n_prompt_tokens"],
            "backed_off_token": healed.attrs.get("backed_off_token", ""),
            "paper": PAPER,
        },
    )


def cover_encodings(model, prefix, top: int | None = 10, **model_kwargs) -> xr.Dataset:
    """The cover encodings of ``prefix`` that the exact model sums, most probable first, with their share of ``P(x)``.

    Byte-Token Representation Lemma ("Exact Byte-Level Probabilities from Tokenized Language
    Models for FIM-Tasks and Model Ensembles", Phan et al., 2024): ``P(x) = sum_{t in cover(x)} P(t)``,
    a cover being a token sequence whose tokens before the last spell a strict prefix of ``x``
    and whose full spelling starts with ``x``. ``share = P(t) / P(x)``; the first ``top`` covers
    are kept (None: all), ``attrs["n_covers"]`` counts them all and ``attrs["share_shown"]`` is
    the share of ``P(x)`` the kept ones carry. Dims: -> (cover,) with coordinates ``tokens``
    (the readable token strings joined by ``|``) and ``n_tokens``.
    """
    byte_model = _as_byte_model(model, **model_kwargs)
    covers = byte_model.covers(prefix)
    prefix_logprob = byte_model.prefix_logprob(prefix)
    kept = covers if top is None else covers[:top]
    logprob = np.array([c[2] for c in kept], dtype=np.float64)
    share = np.exp(logprob - prefix_logprob)
    return xr.Dataset(
        {
            "logprob": ("cover", logprob),
            "probability": ("cover", np.exp(logprob)),
            "share": ("cover", share),
        },
        coords={
            "cover": np.arange(len(kept)),
            "tokens": ("cover", ["|".join(c[1]) for c in kept]),
            "token_ids": ("cover", [json.dumps(list(c[0])) for c in kept]),
            "n_tokens": ("cover", np.array([len(c[0]) for c in kept], dtype=np.int64)),
        },
        attrs={
            "model": byte_model.name,
            "prefix": _as_text(prefix),
            "prefix_logprob": float(prefix_logprob),
            "n_covers": len(covers),
            "share_shown": float(share.sum()),
            "paper": PAPER,
        },
    )


def _as_text(prefix) -> str:
    data = prefix.encode("utf-8") if isinstance(prefix, str) else bytes(prefix)
    return data.decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------- along a text


def bias_along_text(model, text, *, progress: bool | None = None, **model_kwargs) -> xr.Dataset:
    """Naive and token-healed vs exact next-byte distributions at every byte cut of a real text.

    "Understanding and Mitigating Tokenization Bias in Language Models" / "Exact Byte-Level
    Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles" (Phan et
    al., 2024). At cut ``i`` (prefix ``x = text[:i]``, next byte ``text[i]``), for each baseline:
    ``total_variation = 1/2 sum_b |P_baseline(b | x) - P_exact(b | x)|`` and
    ``kl_divergence = KL(P_exact || P_baseline)`` (nats; inf where the baseline gives 0 to a
    byte the exact model allows). The exact distributions come from one
    :meth:`ByteLevelModel.stream` over the text; each baseline is recomputed from scratch at
    every cut (naive: one model pass; token healing: two), as a user of it would.

    Labels of each cut: ``token_boundary`` (``i`` = 0 or the end of a token of the canonical
    encoding of the whole text, :func:`canonical_token_ends`), ``token_index`` (the canonical
    token that byte ``i`` belongs to), ``after_space`` (``text[i-1]`` is whitespace),
    ``mid_character`` (``text[i]`` is a UTF-8 continuation byte: the cut splits a character),
    ``next_byte`` / ``next_char``.

    Dims: text of n bytes -> ``probability`` (estimate, byte_pos, byte), ``logprob`` of the next
    byte (estimate, byte_pos), ``total_variation`` and ``kl_divergence`` (baseline, byte_pos).
    """
    data = _text_bytes(text)
    byte_model = _as_byte_model(model, **model_kwargs)
    handle, context = byte_model.handle, byte_model.context_ids
    n = len(data)
    ends = canonical_token_ends(handle, data)
    started = time.perf_counter()
    exact = byte_model.stream(data, progress=progress)
    exact_seconds = time.perf_counter() - started
    naive = np.zeros((n, 256))
    healed = np.zeros((n, 256))
    cuts = range(n)
    if progress or (progress is None and n > 64):
        from tqdm.auto import tqdm

        cuts = tqdm(cuts, desc=f"naive and token healing ({byte_model.name})", unit="cut")
    for i in cuts:
        naive[i] = naive_next_byte_distribution(handle, data[:i], context).values
        healed[i] = token_healing_next_byte_distribution(handle, data[:i], context).values
    probability = xr.DataArray(
        np.stack([exact["probability"].values, naive, healed]),
        dims=("estimate", "byte_pos", "byte"),
        coords={"estimate": list(ESTIMATES), "byte_pos": np.arange(n), "byte": BYTES,
                "char": ("byte", BYTE_CHARS)},
    )
    targets = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    with np.errstate(divide="ignore"):
        logprob = np.log(probability.values[:, np.arange(n), targets])
    tv, kl = _distances(probability)
    boundary = np.zeros(n, dtype=bool)
    boundary[0] = True
    boundary[ends[ends < n]] = True
    return xr.Dataset(
        {
            "probability": probability,
            "logprob": (("estimate", "byte_pos"), logprob),
            "total_variation": tv.transpose("baseline", "byte_pos"),
            "kl_divergence": kl.transpose("baseline", "byte_pos"),
        },
        coords={
            "next_byte": ("byte_pos", targets),
            "next_char": ("byte_pos", [printable_byte(b) for b in data]),
            "token_boundary": ("byte_pos", boundary),
            "token_index": ("byte_pos", np.searchsorted(ends, np.arange(n), side="right").astype(np.int64)),
            "after_space": ("byte_pos", np.array([i > 0 and data[i - 1] in _WHITESPACE for i in range(n)])),
            "mid_character": ("byte_pos", (targets & 0xC0) == 0x80),
        },
        attrs={
            "model": byte_model.name,
            "text": data.decode("utf-8"),
            "n_bytes": n,
            "n_tokens": len(ends),
            "context_ids": list(context),
            "prune": byte_model.prune,
            "max_hypotheses": -1 if byte_model.max_hypotheses is None else byte_model.max_hypotheses,
            "exact_calls_per_byte": exact.attrs["calls_per_byte"],
            "exact_positions_per_byte": exact.attrs["positions_per_byte"],
            "exact_seconds": round(exact_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "paper": PAPER,
        },
    )


def prompt_cut_invariance(model, text, cuts=None, **model_kwargs) -> xr.Dataset:
    """``log P(text)`` read as prompt + continuation, for every place the prompt could end.

    "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
    Ensembles" (Phan et al., 2024): the exact byte-level answer does not depend on where the
    prompt is cut, the naive token-level one does. For a cut ``k`` (a byte offset on a
    character boundary, ``0 < k < n``):

    - exact: ``log P(text[:k]) + sum_{i >= k} log P(text[i] | text[:i])``, the prompt's cover
      sum plus the continuation's exact next-byte log-probabilities (one stream over the text);
      equal to ``log P(text)`` for every ``k`` up to the renormalisation of pruned mass.
    - naive: ``log p(encode(text[:k])) + log p(encode(text[k:]) | encode(text[:k]))``, the
      token sequence a user gets by encoding prompt and continuation separately, scored by the
      model as it is (one forward pass per cut; raw token probabilities, special tokens not
      conditioned away, so it sits a little below the exact reading even where the tokens agree).

    ``canonical`` (attrs): the naive reading with no cut, ``log p(encode(text))``.
    Dims: text -> (cut,) with ``exact_logprob``, ``exact_continuation``, ``naive_logprob``,
    ``naive_continuation`` (nats), ``prompt_tokens``, ``continuation_tokens``; coordinates
    ``token_boundary`` (the cut is a boundary of the canonical encoding) and ``prompt_end``
    (the last characters of the prompt).
    """
    data = _text_bytes(text)
    byte_model = _as_byte_model(model, **model_kwargs)
    handle, context = byte_model.handle, byte_model.context_ids
    n = len(data)
    starts = [k for k in range(1, n) if (data[k] & 0xC0) != 0x80]
    cuts = starts if cuts is None else [int(k) for k in cuts]
    bad = [k for k in cuts if k not in starts]
    if bad:
        raise ValueError(f"cuts must be byte offsets on character boundaries strictly inside the text (1..{n - 1}); "
                         f"got {bad}.")
    stream = byte_model.stream(data, progress=False)
    step_logprob = stream["logprob"].values
    prefix_logprob = stream["prefix_logprob"].values  # [i] = log P(text[:i + 1])
    ends = set(canonical_token_ends(handle, data).tolist())
    exact_total, exact_cont, naive_total, naive_cont, n_prompt, n_cont = [], [], [], [], [], []
    for k in cuts:
        exact_cont.append(float(step_logprob[k:].sum()))
        exact_total.append(float(prefix_logprob[k - 1]) + exact_cont[-1])
        prompt = _encode(handle, data[:k].decode("utf-8"))
        rest = _encode(handle, data[k:].decode("utf-8"))
        scores = sequence_logprobs(handle, list(context) + prompt + rest)
        naive_cont.append(float(scores[len(context) - 1 + len(prompt):].sum()))
        naive_total.append(float(scores.sum()))
        n_prompt.append(len(prompt))
        n_cont.append(len(rest))
    canonical = float(sequence_logprobs(handle, list(context) + _encode(handle, data.decode("utf-8"))).sum())
    return xr.Dataset(
        {
            "exact_logprob": ("cut", exact_total),
            "exact_continuation": ("cut", exact_cont),
            "naive_logprob": ("cut", naive_total),
            "naive_continuation": ("cut", naive_cont),
            "prompt_tokens": ("cut", np.array(n_prompt, dtype=np.int64)),
            "continuation_tokens": ("cut", np.array(n_cont, dtype=np.int64)),
        },
        coords={
            "cut": np.array(cuts, dtype=np.int64),
            "token_boundary": ("cut", np.array([k in ends for k in cuts])),
            "prompt_end": ("cut", [data[max(0, k - 12):k].decode("utf-8", errors="replace") for k in cuts]),
        },
        attrs={
            "model": byte_model.name,
            "text": data.decode("utf-8"),
            "n_bytes": n,
            "exact_text_logprob": float(stream["prefix_logprob"].values[-1]),
            "canonical": canonical,
            "paper": PAPER,
        },
    )


# --------------------------------------------------------------------------- ensembles


def _bits(logprob: np.ndarray) -> float:
    return float(-np.sum(logprob) / (len(logprob) * math.log(2)))


def ensemble_bits_per_byte(
    handles,
    texts: Sequence[str],
    validation_text: str | None = None,
    *,
    weight_step: float = 0.1,
    progress: bool | None = None,
    **model_kwargs,
) -> xr.Dataset:
    """Bits per byte of each model and of their byte-level ensemble on held-out texts.

    "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
    Ensembles" (Phan et al., 2024): models with different vocabularies become exact byte-level
    models and are mixed in byte space, ``P_ens(b | x) = sum_k w_k P_k(b | x)``
    (:class:`ByteLevelEnsemble`). Bits per byte over all texts together:
    ``bpb = -sum_texts sum_i log2 P(x_i | x_<i) / sum_texts n_bytes``.

    Rows of ``model``: each member (its handle's name), ``"ensemble"`` (equal weights) and, when
    ``validation_text`` is given, ``"ensemble_tuned"``: the weights on the grid of
    :func:`weight_grid` (``weight_step``) with the lowest bits per byte on the validation text,
    chosen there and then applied, unchanged, to ``texts``. ``calls_per_byte``: model forward
    passes per byte of ``texts`` (an ensemble's is the sum of its members'; validation not
    counted). ``token_level_bits_per_byte``: the canonical tokenization scored token by token,
    ``-log2 p(encode(text)) / n_bytes`` (members only), the number a token-level evaluation reports.

    ``handles``: ``{name: ModelHandle}`` or a sequence of handles; ``model_kwargs`` go to each
    :class:`ByteLevelModel`. Dims: -> ``bits_per_byte``, ``calls_per_byte``,
    ``token_level_bits_per_byte`` (model); ``bits_per_byte_by_text`` (model, text); ``weight``
    (model, member); with a validation text ``validation_bits_per_byte`` (grid) and
    ``grid_weight`` (grid, member).
    """
    if isinstance(handles, Mapping):
        names, handle_list = [str(k) for k in handles], list(handles.values())
    else:
        handle_list = list(handles)
        names = [h.name for h in handle_list]
    if len(handle_list) < 2:
        raise ValueError("an ensemble needs at least two models.")
    texts = [t for t in texts]
    if not texts:
        raise ValueError("pass at least one held-out text.")
    data = [_text_bytes(t) for t in texts]
    started = time.perf_counter()
    models = [ByteLevelModel(h, **model_kwargs) for h in handle_list]
    ensemble = ByteLevelEnsemble(models)
    calls_before = [m.calls for m in models]
    member_lp, ensemble_lp = [], []
    for d in data:
        ds = ensemble.stream(d, progress=progress)
        member_lp.append(ds["member_logprob"].values)
        ensemble_lp.append(ds["logprob"].values)
    member_calls = np.array([m.calls - c for m, c in zip(models, calls_before)], dtype=np.float64)
    n_bytes = np.array([len(d) for d in data], dtype=np.int64)
    total = int(n_bytes.sum())
    all_member = np.concatenate(member_lp, axis=1)
    k = len(models)
    rows = names + ["ensemble"]
    weights = np.vstack([np.eye(k), np.full(k, 1.0 / k)])
    by_text = [[_bits(lp[j]) for lp in member_lp] for j in range(k)] + [[_bits(lp) for lp in ensemble_lp]]
    bpb = [_bits(all_member[j]) for j in range(k)] + [_bits(np.concatenate(ensemble_lp))]
    calls = list(member_calls / total) + [member_calls.sum() / total]
    extra, attrs = {}, {}
    if validation_text is not None:
        validation = _text_bytes(validation_text)
        val_member = ensemble.stream(validation, progress=progress)["member_logprob"].values
        grid = weight_grid(k, weight_step)
        val_bits = np.array([_bits(mixture_logprob(val_member, w)) for w in grid])
        # ties (e.g. members that agree) go to the weights closest to equal ones
        spread = np.abs(grid - 1.0 / k).sum(axis=1)
        best = grid[min(range(len(grid)), key=lambda g: (round(float(val_bits[g]), 9), spread[g]))]
        tuned = [mixture_logprob(lp, best) for lp in member_lp]
        rows.append("ensemble_tuned")
        weights = np.vstack([weights, best])
        by_text.append([_bits(lp) for lp in tuned])
        bpb.append(_bits(np.concatenate(tuned)))
        calls.append(member_calls.sum() / total)
        extra = {"validation_bits_per_byte": ("grid", val_bits), "grid_weight": (("grid", "member"), grid)}
        attrs = {"validation_text": validation.decode("utf-8"), "validation_bytes": len(validation),
                 "tuned_weights": [float(w) for w in best], "weight_step": weight_step}
    token_level = [
        float(-sum(sequence_logprobs(h, list(m.context_ids) + _encode(h, d.decode("utf-8"))).sum() for d in data)
              / (total * math.log(2)))
        for h, m in zip(handle_list, models)
    ]
    token_level += [np.nan] * (len(rows) - k)
    return xr.Dataset(
        {
            "bits_per_byte": ("model", np.array(bpb)),
            "bits_per_byte_by_text": (("model", "text"), np.array(by_text)),
            "calls_per_byte": ("model", np.array(calls)),
            "token_level_bits_per_byte": ("model", np.array(token_level)),
            "weight": (("model", "member"), weights),
            **extra,
        },
        coords={
            "model": rows,
            "kind": ("model", ["model"] * k + ["ensemble"] * (len(rows) - k)),
            "member": names,
            "text": np.arange(len(data)),
            **({"grid": np.arange(len(extra["grid_weight"][1]))} if extra else {}),
            "n_bytes": ("text", n_bytes),
        },
        attrs={
            "texts": json.dumps([d.decode("utf-8") for d in data]),
            "total_bytes": total,
            "prune": models[0].prune,
            "max_hypotheses": -1 if models[0].max_hypotheses is None else models[0].max_hypotheses,
            "seconds": round(time.perf_counter() - started, 1),
            "paper": PAPER,
            **attrs,
        },
    )
