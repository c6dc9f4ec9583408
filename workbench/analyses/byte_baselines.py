"""The next-byte baselines that exact byte-level probabilities correct, and distances between distributions.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles": asking a tokenized model for the next byte after an encoded prefix (*naive*) is biased
at cuts inside a token; *token healing* backs off the last token. Both are compared with the exact
:class:`~workbench.analyses.byte_level.ByteLevelModel` by total variation and KL divergence.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..models import ModelHandle
from ..numerics import kl_divergence_arrays
from ..probes.token_scoring import last_token_logprobs, successive_last_token_logprobs
from ..tokenization.vocab_bytes import vocab_bytes
from .byte_level import as_bytes, byte_distribution, byte_token_probs, encode_bytes, start_context


def _context(handle: ModelHandle, context_ids) -> list[int]:
    return list(context_ids) if context_ids is not None else start_context(handle)


def _baseline_attrs(handle, method, data, context, p_special, possible, **extra) -> dict:
    return {
        "method": method,
        "model": handle.name,
        "prefix": data.decode("utf-8", errors="backslashreplace"),
        "prefix_bytes": len(data),
        "context_ids": list(context),
        "p_end_of_text": float(p_special),
        "impossible_bytes": [int(b) for b in np.flatnonzero(~possible)],
        "note": "bytes in impossible_bytes have probability 0: no token of this vocabulary continues the prefix "
        "with them under this method",
        **extra,
    }


def naive_next_byte_distribution(handle: ModelHandle, prefix, context_ids=None) -> xr.DataArray:
    """The biased baseline: encode the prefix, take the next-token distribution, collapse it onto first bytes.

    Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and
    Model Ensembles" (the tokenization bias this shows):
    ``P_naive(b | x) = sum_{t : bytes(t)[0] = b} q(t | context, encode(x))`` with ``q`` the next-token
    distribution renormalised over byte tokens (as in :class:`ByteLevelModel`). Bytes of an
    incomplete UTF-8 character at the end are encoded as single-byte tokens. One model call.
    Dims: -> (byte,).
    """
    data = as_bytes(prefix)
    vocab = vocab_bytes(handle.tokenizer)
    context = _context(handle, context_ids)
    ids = context + encode_bytes(handle, vocab, data)
    q, p_special = byte_token_probs(last_token_logprobs(handle, ids), vocab)
    values = np.bincount(vocab.byte_matrix[0], weights=q, minlength=256)
    attrs = _baseline_attrs(handle, "naive", data, context, p_special, vocab.producible_first_bytes(),
                            n_prompt_tokens=len(ids) - len(context))
    return byte_distribution(values / values.sum(), "next_byte_probability", attrs)


def naive_next_byte_stream(handle: ModelHandle, text, cuts=None, context_ids=None) -> xr.Dataset:
    """:func:`naive_next_byte_distribution` after ``text[:i]`` for every cut ``i``, reusing the KV cache.

    The same numbers as calling the function at each cut (tested); the prefix the encodings of
    successive cuts share is run once (:func:`~workbench.probes.token_scoring.successive_last_token_logprobs`).
    ``cuts``: byte offsets (default every byte, 0..n-1). Dims: -> probability (cut, byte),
    tokens_run (cut,).
    """
    data = as_bytes(text)
    cuts = list(range(len(data))) if cuts is None else [int(c) for c in cuts]
    if any(not 0 <= c <= len(data) for c in cuts):
        raise ValueError(f"cuts must lie in 0..{len(data)} (the text has {len(data)} bytes).")
    vocab = vocab_bytes(handle.tokenizer)
    context = _context(handle, context_ids)
    sequences = (context + encode_bytes(handle, vocab, data[:c]) for c in cuts)
    probability, tokens_run = np.zeros((len(cuts), 256)), np.zeros(len(cuts), dtype=np.int64)
    for k, (logprobs, n_run) in enumerate(successive_last_token_logprobs(handle, sequences)):
        q, _ = byte_token_probs(logprobs, vocab)
        values = np.bincount(vocab.byte_matrix[0], weights=q, minlength=256)
        probability[k], tokens_run[k] = values / values.sum(), n_run
    return xr.Dataset(
        {"probability": (("cut", "byte"), probability), "tokens_run": ("cut", tokens_run)},
        coords={"cut": cuts, "byte": np.arange(256)},
        attrs={"method": "naive", "model": handle.name, "context_ids": list(context)},
    )


def token_healing_next_byte_distribution(handle: ModelHandle, prefix, context_ids=None) -> xr.DataArray:
    """Token healing: back off the prefix's last token and constrain the next token to start with its bytes.

    "Token Alignment via Character Matching for Subword Completion" / Guidance's token healing,
    as compared in Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
    for FIM-Tasks and Model Ensembles". With ``encode(x) = e_1..e_k`` and ``r = bytes(e_k)``, the
    first generated token is drawn from ``q(. | context, e_<k)`` restricted to tokens whose bytes
    start with ``r``; the next byte is that token's byte after ``r``, or, if the token is ``e_k``
    itself, the first byte of the token after it (the naive distribution):

        P_heal(b | x) = [ sum_{t : bytes(t) = r b ...} q(t | e_<k) + q(e_k | e_<k) P_naive(b | x) ]
                        / sum_{t : bytes(t) starts with r, t != other tokens spelling exactly r} q(t | e_<k)

    Two model calls (one when the prefix is empty: then it is the naive distribution). Dims: -> (byte,).
    """
    data = as_bytes(prefix)
    vocab = vocab_bytes(handle.tokenizer)
    context = _context(handle, context_ids)
    encoded = encode_bytes(handle, vocab, data)
    naive = naive_next_byte_distribution(handle, data, context)
    if not encoded:
        naive.attrs["method"] = "token_healing"
        return naive
    last = encoded[-1]
    r = vocab.token_bytes[last]
    q, p_special = byte_token_probs(last_token_logprobs(handle, context + encoded[:-1]), vocab)
    lo, hi = vocab.prefix_range(r)
    n_exact = len(vocab.tokens_equal_to(r))
    longer_ids = slice(lo + n_exact, hi)  # tokens strictly longer than r that start with it
    possible = np.zeros(256, dtype=bool)
    if len(r) < vocab.byte_matrix.shape[0]:
        longer = np.bincount(vocab.byte_matrix[len(r), longer_ids], weights=q[longer_ids], minlength=256)
        possible[np.unique(vocab.byte_matrix[len(r), longer_ids])] = True
    else:  # r is as long as the longest token: nothing extends it
        longer = np.zeros(256)
    q_last = q[vocab.rank[last]]
    values = longer + q_last * naive.values
    if q_last > 0:
        possible |= np.asarray(naive.values > 0) | vocab.producible_first_bytes()
    attrs = _baseline_attrs(handle, "token_healing", data, context, p_special, possible,
                            backed_off_token=vocab.token_string(last), p_backed_off_token=float(q_last / (values.sum())))
    return byte_distribution(values / values.sum(), "next_byte_probability", attrs)


# --------------------------------------------------------------------------- comparing distributions


def _reduce(result):
    return float(result) if result.ndim == 0 else result


def total_variation(p: xr.DataArray, q: xr.DataArray):
    """Total variation distance between next-byte distributions, ``TV = 1/2 sum_b |p(b) - q(b)|``.

    Dims: (..., byte) x (..., byte) -> (...) (a float when nothing is left).
    """
    return _reduce(0.5 * abs(p - q).sum("byte"))


def kl_divergence(p: xr.DataArray, q: xr.DataArray):
    """Kullback-Leibler divergence ``KL(p || q) = sum_b p(b) log(p(b) / q(b))`` in nats (inf where q = 0 < p).

    Dims: (..., byte) x (..., byte) -> (...) (a float when nothing is left).
    """
    p, q = xr.align(p, q, join="exact")
    return _reduce(xr.apply_ufunc(kl_divergence_arrays, p, q, input_core_dims=[["byte"], ["byte"]]))


