"""Evaluating token alignment on text cut at random characters: completions, exact matches, Wilson intervals.

"Token Alignment via Character Matching for Subword Completion" (Athiwaratkun et al., 2024): prompts
that end inside a token produce bad completions; backing off and re-spelling fixes it. This module
cuts real prose and code at random characters, completes them with each method of
:mod:`workbench.analyses.token_alignment` and scores the first word of the completion.
"""

from __future__ import annotations

import re
import time

import numpy as np
import xarray as xr

from ..models import ModelHandle
from ..numerics import wilson_interval
from ..tokenization.vocab_bytes import VocabBytes, vocab_bytes
from .byte_level import start_context
from .token_alignment import PAPER, _check_length, _check_limits, _generate, _open, _prepare, _score

__all__ = ["match_rates", "next_word", "sample_cuts", "token_alignment_evaluation"]

_NEXT_WORD = re.compile(r"\s*(?:\w+|[^\w\s]+)?")

def next_word(text: str) -> str:
    """The next word of ``text``: leading whitespace, then a run of word characters or of punctuation.

    ``"x jumps"`` -> ``"x"``; ``" fox"`` -> ``" fox"``; ``"\\n    return x"`` -> ``"\\n    return"``;
    ``"(a, b)"`` -> ``"("``.
    """
    return _NEXT_WORD.match(text).group(0)


def sample_cuts(texts, n_prompts: int, seed: int = 0, *, min_prompt_chars: int = 16,
                min_continuation_chars: int = 16) -> list[tuple[str, int, int]]:
    """Seeded random cut points: ``(domain, text_index, cut)`` with prompt ``text[:cut]``, ``n_prompts`` per domain.

    ``texts``: ``{domain: [text, ...]}`` or a list of texts (domain ``"text"``). Texts are visited
    in a seeded random order (cycling when ``n_prompts`` exceeds their number); each cut is a
    uniform character position leaving at least ``min_prompt_chars`` before and
    ``min_continuation_chars`` after it; no (text, cut) pair repeats. Each domain draws from
    ``np.random.default_rng([seed, domain index])``.
    """
    domains = _as_domains(texts)
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a whole number >= 1, got {n_prompts!r}.")
    cuts = []
    for d, (domain, items) in enumerate(domains.items()):
        usable = [i for i, t in enumerate(items) if len(t) >= min_prompt_chars + min_continuation_chars]
        room = sum(len(items[i]) - min_prompt_chars - min_continuation_chars + 1 for i in usable)
        if room < n_prompts:
            raise ValueError(
                f"domain {domain!r} has room for {room} distinct cuts (texts of at least "
                f"{min_prompt_chars + min_continuation_chars} characters), fewer than n_prompts={n_prompts}."
            )
        rng = np.random.default_rng([seed, d])
        order = rng.permutation(usable)
        seen = set()
        j = 0
        while len(seen) < n_prompts:
            i = int(order[j % len(order)])
            j += 1
            cut = int(rng.integers(min_prompt_chars, len(items[i]) - min_continuation_chars + 1))
            if (i, cut) not in seen:
                seen.add((i, cut))
                cuts.append((domain, i, cut))
    return cuts


def _as_domains(texts) -> dict[str, list[str]]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts or a {domain: [texts]} dict, not one string.")
    domains = dict(texts) if isinstance(texts, dict) else {"text": list(texts)}
    if not domains or any(not list(v) for v in domains.values()):
        raise ValueError("texts is empty (or a domain has no texts): give at least one text per domain.")
    for domain, items in domains.items():
        if not all(isinstance(t, str) for t in items):
            raise TypeError(f"domain {domain!r}: every text must be a str.")
    return {str(k): list(v) for k, v in domains.items()}


def _token_boundaries(vocab: VocabBytes, ids) -> set[int]:
    lengths = [len(vocab.token_bytes[t] or b"") for t in ids]
    return set(np.cumsum([0] + lengths).tolist())


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_alignment_evaluation(
    handle: ModelHandle,
    texts,
    n_prompts: int = 40,
    seed: int = 0,
    *,
    back_offs=(1,),
    max_new_bytes: int = 24,
    max_new_tokens: int = 24,
    match_chars: int = 8,
    score_bytes: int | None = 8,
    prune: float = 1e-4,
    max_nodes: int = 32,
    continuation_chars: int = 64,
    progress: bool = False,
) -> xr.Dataset:
    """Cut real texts at random characters, complete each prompt plainly and with token alignment, score both.

    "Token Alignment via Character Matching for Subword Completion" (Athiwaratkun et al., 2024).
    Cuts come from :func:`sample_cuts` (``texts``, ``n_prompts`` per domain, ``seed``). Methods:
    ``plain`` (back-off 0) and ``aligned-k`` for each ``k`` in ``back_offs``; all greedy.

    Per prompt and method (dims ``prompt``, ``decoding``):

    - ``completion``: the greedy completion after the prompt (at least ``max_new_bytes`` bytes
      unless the model stops); ``word_match``: ``next_word(completion) == next_word(continuation)``;
      ``prefix_match``: the first ``match_chars`` characters equal the true ones; ``matched_chars``:
      length of the common prefix of completion and true continuation;
    - ``continuation_logprob``: ``log P_method(first score_bytes bytes of the true continuation)``
      (nats; :func:`continuation_logprob` with ``prune`` and ``max_nodes``), with ``pruned_mass``
      (``score_bytes=None`` skips scoring);
    - ``generation_calls`` / ``generation_positions``: what the completion costs run on its own
      (the context's pass, then one pass per generated token), ``scoring_calls``,
      ``constrained_steps``, ``back_off`` (tokens actually dropped).

    Per prompt: ``domain``, ``text_index``, ``cut`` (characters), ``cut_byte``, ``prompt_text``,
    ``continuation_text`` (the next ``continuation_chars`` true characters), ``n_prompt_tokens``,
    ``calls`` and ``seconds`` (everything run for the prompt: the methods share one scorer, so the
    context runs once, for the largest back-off, and each smaller back-off adds one token),
    ``cut_inside_token`` (the cut is not a token boundary of the whole text's encoding) and
    ``tokens_to_realign`` (prompt tokens after the longest common prefix of ``encode(prompt)``
    and ``encode(text)``: backing off at least that many puts the model on the text's own tokens).
    """
    if isinstance(match_chars, bool) or not isinstance(match_chars, (int, np.integer)) or match_chars < 1:
        raise ValueError(f"match_chars must be a whole number >= 1, got {match_chars!r}.")
    if score_bytes is not None and score_bytes < 1:
        raise ValueError(f"score_bytes must be >= 1 or None, got {score_bytes!r}.")
    _check_limits(max_new_tokens, max_new_bytes, 1.0)
    back_offs = [int(k) for k in back_offs]
    if not back_offs or any(k < 1 for k in back_offs) or len(set(back_offs)) != len(back_offs):
        raise ValueError(
            f"back_offs must be distinct whole numbers >= 1 (plain is always included), got {back_offs!r}.")
    domains = _as_domains(texts)
    cuts = sample_cuts(domains, n_prompts, seed, min_continuation_chars=max(match_chars, 1))
    methods = ["plain"] + [f"aligned-{k}" for k in back_offs]
    method_back_off = [0] + back_offs
    vocab = vocab_bytes(handle.tokenizer)
    n, m = len(cuts), len(methods)
    per_method = {name: np.zeros((n, m), dtype=dtype) for name, dtype in [
        ("word_match", bool), ("prefix_match", bool), ("matched_chars", np.int64), ("continuation_logprob", float),
        ("pruned_mass", float), ("generation_calls", np.int64), ("generation_positions", np.int64),
        ("scoring_calls", np.int64), ("constrained_steps", np.int64), ("back_off", np.int64)]}
    completions = np.empty((n, m), dtype=object)
    stop_reasons = np.empty((n, m), dtype=object)
    per_prompt = {k: [] for k in ("prompt", "continuation", "cut_byte", "n_prompt_tokens", "cut_inside_token",
                                  "tokens_to_realign", "seconds", "calls")}
    steps = cuts
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(cuts, desc=f"token alignment ({handle.name})", unit="prompt")
    for i, (domain, index, cut) in enumerate(steps):
        text = domains[domain][index]
        prompt, truth = text[:cut], text[cut:]
        text_ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids = handle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        cut_byte = len(prompt.encode("utf-8"))
        per_prompt["prompt"].append(prompt)
        per_prompt["continuation"].append(truth[:continuation_chars])
        per_prompt["cut_byte"].append(cut_byte)
        per_prompt["n_prompt_tokens"].append(len(prompt_ids))
        per_prompt["cut_inside_token"].append(cut_byte not in _token_boundaries(vocab, text_ids))
        per_prompt["tokens_to_realign"].append(len(prompt_ids) - _common_prefix(prompt_ids, text_ids))
        target = truth.encode("utf-8")[:score_bytes] if score_bytes is not None else None
        started = time.perf_counter()
        calls = _evaluate_prompt(handle, prompt, prompt_ids, target, methods, method_back_off, i, per_method,
                                 completions, stop_reasons, truth, prune, max_nodes, max_new_tokens, max_new_bytes,
                                 match_chars)
        per_prompt["seconds"].append(time.perf_counter() - started)
        per_prompt["calls"].append(calls)
    dims = ("prompt", "decoding")
    data = {name: (dims, values) for name, values in per_method.items()}
    data["completion"] = (dims, completions.astype(str))
    data["stop_reason"] = (dims, stop_reasons.astype(str))
    for name in ("prompt", "continuation"):
        data[f"{name}_text"] = (("prompt",), np.asarray(per_prompt[name], dtype=str))
    for name in ("cut_byte", "n_prompt_tokens", "tokens_to_realign", "calls"):
        data[name] = (("prompt",), np.asarray(per_prompt[name], dtype=np.int64))
    data["seconds"] = (("prompt",), np.asarray(per_prompt["seconds"], dtype=float))
    data["cut_inside_token"] = (("prompt",), np.asarray(per_prompt["cut_inside_token"], dtype=bool))
    ds = xr.Dataset(
        data,
        coords={
            "prompt": np.arange(n),
            "decoding": methods,
            "requested_back_off": ("decoding", np.asarray(method_back_off, dtype=np.int64)),
            "domain": ("prompt", np.asarray([c[0] for c in cuts], dtype=str)),
            "text_index": ("prompt", np.asarray([c[1] for c in cuts], dtype=np.int64)),
            "cut": ("prompt", np.asarray([c[2] for c in cuts], dtype=np.int64)),
        },
        attrs={
            "paper": PAPER,
            "model": handle.name,
            "seed": seed,
            "n_prompts_per_domain": n_prompts,
            "max_new_bytes": max_new_bytes,
            "max_new_tokens": max_new_tokens,
            "match_chars": match_chars,
            "score_bytes": -1 if score_bytes is None else score_bytes,
            "prune": prune,
            "max_nodes": max_nodes,
            "decoding": "greedy",
            "start_context": start_context(handle),
        },
    )
    _describe(ds)
    return ds


def _evaluate_prompt(handle, prompt, prompt_ids, target, methods, method_back_off, i, per_method, completions,
                     stop_reasons, truth, prune, max_nodes, max_new_tokens, max_new_bytes, match_chars) -> int:
    """Every method on one prompt, sharing one scorer: the context pass runs once, for the largest back-off.

    The context of back-off ``k`` is that of ``k + 1`` plus one prompt token, so the methods run in
    order of decreasing back-off and each root is one token past the previous one. Neither scoring
    nor generation commits, so every root stays usable. Returns the forward passes run.
    """
    order = sorted(range(len(methods)), key=lambda j: -method_back_off[j])
    current = min(method_back_off[order[0]], len(prompt_ids))
    setup = _prepare(handle, prompt, current)
    _check_length(handle, setup, max(max_new_tokens, len(target or b"")))
    scorer, root = _open(handle, setup)
    for j in order:
        k = min(method_back_off[j], len(prompt_ids))
        while current > k:  # one prompt token more in the context
            (root,) = scorer.extend([(root, prompt_ids[len(prompt_ids) - current])])
            current -= 1
        setup = _prepare(handle, prompt, k)
        if target is not None:
            score = _score(setup, scorer, root, target, methods[j], prune, max_nodes)
            per_method["continuation_logprob"][i, j] = score.logprob
            per_method["pruned_mass"][i, j] = score.pruned_mass
            per_method["scoring_calls"][i, j] = score.calls
        else:
            per_method["continuation_logprob"][i, j] = np.nan
            per_method["pruned_mass"][i, j] = np.nan
        done = _generate(setup, scorer, root, methods[j], max_new_tokens, max_new_bytes, None, 1.0, commit=False)
        completions[i, j] = done.text
        stop_reasons[i, j] = done.stop_reason
        per_method["word_match"][i, j] = next_word(done.text) == next_word(truth)
        per_method["prefix_match"][i, j] = done.text[:match_chars] == truth[:match_chars]
        per_method["matched_chars"][i, j] = _common_prefix(done.text, truth)
        per_method["generation_calls"][i, j] = done.calls
        per_method["generation_positions"][i, j] = done.positions
        per_method["constrained_steps"][i, j] = done.constrained_steps
        per_method["back_off"][i, j] = done.back_off
    return scorer.calls


_DESCRIPTIONS = {
    "word_match": "next_word(completion) == next_word(true continuation)",
    "prefix_match": "the first match_chars characters of the completion equal the true ones",
    "matched_chars": "length of the common prefix of the completion and the true continuation (characters)",
    "continuation_logprob": "log P_method(first score_bytes bytes of the true continuation | prompt), nats",
    "pruned_mass": "probability of token sequences not followed while scoring (upper bound on what is missing)",
    "generation_calls": "model forward passes a standalone completion runs (the context's pass, then one per token)",
    "generation_positions": "token positions a standalone completion runs (context + generated tokens)",
    "scoring_calls": "extra forward passes to score the true continuation",
    "constrained_steps": "generated tokens chosen under the alignment constraint",
    "back_off": "prompt tokens backed off",
    "seconds": "wall time of every method's scoring and generation for this prompt",
    "calls": "model forward passes actually run for this prompt, every method (one shared context pass)",
    "cut_inside_token": "the cut is not a token boundary of the whole text's own encoding",
    "tokens_to_realign": "prompt tokens after the longest common prefix of encode(prompt) and encode(text)",
}


def _describe(ds: xr.Dataset) -> None:
    for name, text in _DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text


def match_rates(results: xr.Dataset, *, subset: str = "all") -> xr.Dataset:
    """Match rates per domain and method, with 95% Wilson intervals.

    ``rate[metric, domain, decoding] = mean over prompts of the domain of metric`` for ``metric`` in
    (``word_match``, ``prefix_match``); ``low``/``high``: Wilson score interval; ``n``: prompts.
    ``subset``: ``"all"`` prompts, ``"inside_token"`` (cuts inside a token of the text) or
    ``"at_boundary"``. Also ``mean_logprob`` (domain, decoding): mean ``continuation_logprob``.
    Dims: (prompt, decoding) -> (metric, domain, decoding).
    """
    masks = {"all": None, "inside_token": True, "at_boundary": False}
    if subset not in masks:
        raise ValueError(f"subset must be one of {', '.join(masks)}, got {subset!r}.")
    metrics = ["word_match", "prefix_match"]
    domain_of = results["domain"].values.astype(str)
    domains = list(dict.fromkeys(domain_of))
    methods = [str(m) for m in results["decoding"].values]
    inside = results["cut_inside_token"].values.astype(bool)
    successes = np.zeros((len(metrics), len(domains), len(methods)))
    count = np.zeros(len(domains), dtype=np.int64)
    mean_lp = np.full((len(domains), len(methods)), np.nan)
    for d, domain in enumerate(domains):
        keep = domain_of == domain
        if masks[subset] is not None:
            keep &= inside == masks[subset]
        part = results.isel(prompt=np.flatnonzero(keep))
        count[d] = part.sizes["prompt"]
        if not count[d]:
            continue
        for k, metric in enumerate(metrics):
            successes[k, d] = part[metric].values.astype(float).sum(axis=0)
        mean_lp[d] = part["continuation_logprob"].values.mean(axis=0)
    n = np.broadcast_to(count[None, :, None], successes.shape).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = successes / n
    low, high = wilson_interval(successes, n)
    return xr.Dataset(
        {
            "rate": (("metric", "domain", "decoding"), rate),
            "low": (("metric", "domain", "decoding"), low),
            "high": (("metric", "domain", "decoding"), high),
            "n": (("domain",), count),
            "mean_logprob": (("domain", "decoding"), mean_lp),
        },
        coords={"metric": metrics, "domain": domains, "decoding": methods},
        attrs={"paper": PAPER, "model": results.attrs.get("model", ""), "subset": subset,
               "match_chars": results.attrs.get("match_chars", -1)},
    )
