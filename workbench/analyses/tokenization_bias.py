"""Tokenization bias on a known Markov chain: next-character probabilities read three ways, and their errors.

Paper: "Understanding and Mitigating Tokenization Bias in Language Models" (Phan, Havasi,
Muckley & Ullrich, 2024). A model trained on tokenised text, prompted with the *encoding*
of a prefix, answers ``P(next char | the prompt's tokens)``, not ``P(next char | prefix)``:
under maximum-prefix encoding and BPE the token boundary at the end of the prompt carries
information about the characters that follow, so the naive answer is biased however well
the model is trained. The corrected estimate sums over every token sequence that spells
the prefix (the cover encodings of "Exact Byte-Level Probabilities from Tokenized
Language Models for FIM-Tasks and Model Ensembles", Phan et al., 2024, implemented in
:mod:`workbench.analyses.byte_level`) and recovers the chain's transitions.

The three estimates of ``P(c | x)`` for a context ``x`` of the chain's order and each
character ``c`` of its alphabet:

- ``true``: the chain's transition matrix.
- ``naive``: ``sum_{t: t starts with c} p(t | <s> encode(x)) / sum_{c'} sum_{t: t starts with c'} p(t | ...)``,
  the next-token distribution after the encoded prompt collapsed to first characters.
- ``exact``: ``P_byte(c | x) / sum_{c'} P_byte(c' | x)`` with ``P_byte`` the exact next-byte
  distribution of :class:`~workbench.analyses.byte_level.ByteLevelModel` (summing every cover).
- ``naive_limit``: what naive prompting gives for a *perfectly* trained model, computed from
  the chain and the tokenizer alone (no model): ``P(c | the text's encoding starts with
  encode(x))``. The trained model's naive answer approaching it, rather than the truth,
  shows the bias is the tokenization's and not under-training.

Both model-based estimates are renormalised over the alphabet; the probability left
outside it (end of text, special tokens) is kept as ``outside_mass``. The three sit along a
dim named ``estimate`` (not ``method``: ``DataArray.sel(method=...)`` is xarray's own
keyword and would silently not select). Pure functions:
model handles and a chain in, labelled DataArrays/Datasets out; no files, no plots.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from ..models.markov_chain import MarkovChain
from ..models import ModelHandle
from .byte_baselines import naive_next_byte_distribution
from .byte_level import ByteLevelModel

ESTIMATES = ("true", "exact", "naive", "naive_limit")


def _check_alphabet(alphabet: Sequence[str]) -> list[str]:
    alphabet = list(alphabet)
    if not alphabet or any(len(c) != 1 or not c.isascii() for c in alphabet):
        raise ValueError(f"the alphabet must be single ASCII characters (one byte each), got {alphabet!r}.")
    return alphabet


def _estimate(values: np.ndarray, outside: np.ndarray, contexts, alphabet, name: str) -> xr.Dataset:
    return xr.Dataset(
        {
            "probability": (("context", "next_char"), values),
            "outside_mass": ("context", outside),
        },
        coords={"context": list(contexts), "next_char": list(alphabet)},
        attrs={"estimate": name},
    )


def _on_alphabet(dist: xr.DataArray, alphabet: list[str], who: str, prefix: str) -> tuple[np.ndarray, float]:
    """A next-byte distribution restricted to ``alphabet`` and renormalised; and the probability of anything else.

    ``outside = p_end + (1 - p_end) * (1 - sum_{c in alphabet} P(c))``, with ``p_end`` the
    end-of-text probability the byte-level functions report beside the 256 bytes.
    """
    values = dist.sel(byte=[ord(c) for c in alphabet]).values
    inside = float(values.sum())
    if inside <= 0:
        raise ValueError(f"{who}: after {prefix!r} the model puts no probability on a character of {alphabet}.")
    p_end = float(dist.attrs.get("p_end_of_text", 0.0))
    return values / inside, p_end + (1.0 - p_end) * (1.0 - inside)


def naive_transitions(handle: ModelHandle, contexts: Sequence[str], alphabet: Sequence[str]) -> xr.Dataset:
    """Naive prompting: the next-token distribution after ``<s> encode(x)`` collapsed to first characters, per context.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al., 2024):
    ``P_naive(c | x) ∝ sum_{t in V, t[0] = c} p(t | <s> encode(x))``, renormalised over
    ``alphabet`` (through :func:`workbench.analyses.byte_baselines.naive_next_byte_distribution`).
    Dims: -> probability (context, next_char), outside_mass (context).
    """
    alphabet = _check_alphabet(alphabet)
    rows = [_on_alphabet(naive_next_byte_distribution(handle, x), alphabet, handle.name, x) for x in contexts]
    return _estimate(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), contexts, alphabet, "naive")


def exact_transitions(handle: ModelHandle, contexts: Sequence[str], alphabet: Sequence[str]) -> xr.Dataset:
    """Cover-sum (exact byte-level) estimate of ``P(next_char | context)`` for every context.

    "Exact Byte-Level Probabilities from Tokenized Language Models" (Phan et al., 2024), as
    the correction of "Understanding and Mitigating Tokenization Bias": ``P(c | x) =
    P(x c) / P(x)`` with ``P(x) = sum_{t in cover(x)} P(t)``, every cover summed (no
    pruning), renormalised over ``alphabet``. Dims: -> probability (context, next_char),
    outside_mass (context).
    """
    alphabet = _check_alphabet(alphabet)
    model = ByteLevelModel(handle, prune=0.0, max_hypotheses=None)
    rows = [_on_alphabet(model.next_byte_distribution(x), alphabet, handle.name, x) for x in contexts]
    return _estimate(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), contexts, alphabet, "exact")


def naive_limit_transitions(chain: MarkovChain, tokenizer, lookahead: int = 10) -> xr.Dataset:
    """The naive-prompting answer of a perfectly trained model, from the chain and the tokenizer alone.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al., 2024):
    prompting with ``t = encode(x)`` (``k`` tokens) conditions on the text's encoding
    starting with ``t``, so a model equal to the token distribution answers
    ``P_lim(c | x) = sum_{y in A^m: y_1 = c, E(y)} P(y | x) / sum_{y in A^m: E(y)} P(y | x)``,
    ``E(y) = [encode(x y)[:k] == t]``, over every continuation ``y`` of ``m = lookahead``
    characters. Exact for maximum-prefix encoding once ``m`` >= the longest token minus one;
    for BPE it assumes characters more than ``m`` away do not change the first ``k`` tokens.
    NaN where no continuation keeps ``t`` (e.g. MPE over {A, B, AA, BAB, ...}: ``"ABA"`` encodes
    as A|B|A, but any longer text re-tokenises its end): such a prompt has probability 0 under
    the tokenised data, so a trained model answers it out of distribution.
    Dims: -> probability (context, next_char), outside_mass (context; 0).
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be 1 or more characters, got {lookahead}.")
    alphabet = list(chain.alphabet)
    contexts = chain.contexts
    continuations = ["".join(y) for y in itertools.product(alphabet, repeat=lookahead)]
    first = np.array([alphabet.index(y[0]) for y in continuations])
    values = np.zeros((len(contexts), len(alphabet)))
    for row, x in enumerate(contexts):
        prompt = tokenizer(x, add_special_tokens=False)["input_ids"]
        k = len(prompt)
        encoded = tokenizer([x + y for y in continuations], add_special_tokens=False)["input_ids"]
        keep = np.array([ids[:k] == prompt for ids in encoded])
        base = chain.log_probability(x)
        weights = np.exp([chain.log_probability(x + y) - base for y in continuations]) * keep
        if weights.sum() > 0:
            values[row] = np.bincount(first, weights=weights, minlength=len(alphabet)) / weights.sum()
        else:  # encode(x) starts no longer text: a perfect model never saw this prompt
            values[row] = np.nan
    return _estimate(values, np.zeros(len(contexts)), contexts, alphabet, "naive_limit")


def transition_estimates(
    handle: ModelHandle, chain: MarkovChain, lookahead: int = 10, naive_limit: xr.Dataset | None = None
) -> xr.Dataset:
    """True, exact, naive and naive-limit ``P(next_char | context)`` for every context of ``chain``, side by side.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al., 2024);
    the four estimates of the module docstring (``lookahead`` for the naive limit; pass
    ``naive_limit`` from :func:`naive_limit_transitions` to reuse it across checkpoints).
    Dims: -> probability (estimate, context, next_char), outside_mass (estimate, context; 0 for true).
    """
    contexts, alphabet = chain.contexts, list(chain.alphabet)
    parts = {
        "true": _estimate(chain.transitions, np.zeros(len(contexts)), contexts, alphabet, "true"),
        "exact": exact_transitions(handle, contexts, alphabet),
        "naive": naive_transitions(handle, contexts, alphabet),
        "naive_limit": naive_limit if naive_limit is not None else naive_limit_transitions(
            chain, handle.tokenizer, lookahead),
    }
    estimates = xr.concat([parts[name] for name in ESTIMATES],
                          dim=xr.DataArray(list(ESTIMATES), dims="estimate", name="estimate"))
    estimates.attrs = {"model": handle.name, "chain_order": chain.order}
    return estimates


def transition_errors(estimates: xr.Dataset) -> xr.Dataset:
    """Absolute errors of each estimate against the true transitions, reduced over contexts and characters.

    ``abs_error[m, x, c] = |P_m(c | x) - P_true(c | x)|``; ``max_abs_error[m] = max_{x,c}``,
    ``mean_abs_error[m] = mean_{x,c}``. Dims: probability (estimate, context, next_char, ...)
    -> abs_error (same dims), max_abs_error and mean_abs_error (estimate, ...).
    """
    probability = estimates["probability"]
    if "true" not in probability["estimate"].values:
        raise ValueError("the estimates have no 'true' estimate to measure errors against; use transition_estimates().")
    abs_error = abs(probability - probability.sel(estimate="true", drop=True))
    return xr.Dataset(
        {
            "abs_error": abs_error,
            "max_abs_error": abs_error.max(("context", "next_char")),
            "mean_abs_error": abs_error.mean(("context", "next_char")),
        }
    )


def checkpoint_sweep(
    checkpoints: Mapping[str, Mapping[int, ModelHandle]], chain: MarkovChain, progress: bool = True
) -> xr.Dataset:
    """Estimates and errors for every tokenizer and training step, to see whether training removes the bias.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al., 2024):
    the naive error should stay put as training goes on while the exact error shrinks.
    ``checkpoints``: tokenizer name -> {step: handle}; every tokenizer must have the same steps.
    Dims: -> probability (tokenizer, step, estimate, context, next_char), outside_mass
    (tokenizer, step, estimate, context), abs_error, max_abs_error / mean_abs_error (tokenizer, step, estimate).
    """
    from tqdm.auto import tqdm

    if not checkpoints:
        raise ValueError("no checkpoints given: pass {tokenizer name: {step: ModelHandle}}.")
    steps = {name: sorted(by_step) for name, by_step in checkpoints.items()}
    first = next(iter(steps.values()))
    if any(s != first for s in steps.values()) or not first:
        raise ValueError(f"every tokenizer needs the same, non-empty checkpoint steps; got {steps}.")
    total = len(checkpoints) * len(first)
    bar = tqdm(total=total, desc="estimating transitions", unit="checkpoint", disable=not progress, leave=False)
    per_tokenizer = []
    for name, by_step in checkpoints.items():
        limit = naive_limit_transitions(chain, by_step[first[0]].tokenizer)
        rows = []
        for step in first:
            rows.append(transition_estimates(by_step[step], chain, naive_limit=limit))
            bar.update()
        per_tokenizer.append(xr.concat(rows, dim=xr.DataArray(first, dims="step", name="step")))
    bar.close()
    estimates = xr.concat(per_tokenizer, dim=xr.DataArray(list(checkpoints), dims="tokenizer", name="tokenizer"))
    estimates.attrs = {"chain_order": chain.order}
    return xr.merge([estimates, transition_errors(estimates)], combine_attrs="override")
