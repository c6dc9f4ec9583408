"""Shared numerics, one home: KL divergence, entropy, log-sum-exp, Wilson intervals, line fits.

Torch versions work on log-probabilities along the last dim (what models give); the xarray and
numpy ones defer to scipy where scipy does the job (``rel_entr``, ``binomtest``, ``linregress``).
"""

from __future__ import annotations

import numpy as np
import torch


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``KL(p || q) = sum p (log p - log q)`` in nats from log-probabilities (terms with p = 0 are 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim)


def entropy_from_logprobs(logp: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``H(p) = -sum p log p`` in nats from log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim)


def entropy_from_probs(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``H(p) = -sum p log p`` in nats from probabilities (``xlogy``: 0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(dim)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32, or in the logits' own precision when that is finer (float64 test models)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def logsumexp(values) -> float:
    """``log sum exp(v)`` of plain floats; -inf for no values or all -inf."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(np.logaddexp.reduce(values)) if values.size else -np.inf


def kl_divergence_arrays(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """``KL(p || q)`` in nats along ``axis`` (scipy ``rel_entr``: 0 where p = 0, inf where q = 0 < p)."""
    from scipy.special import rel_entr

    return rel_entr(p, q).sum(axis)


def wilson_interval(successes, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion, per element (scipy ``binomtest(...).proportion_ci``); NaN where n = 0."""
    from scipy.stats import binomtest

    successes, n = np.broadcast_arrays(np.asarray(successes, dtype=np.int64), np.asarray(n, dtype=np.int64))
    low, high = np.full(n.shape, np.nan), np.full(n.shape, np.nan)
    for i in np.ndindex(n.shape):
        if n[i] > 0:
            ci = binomtest(int(successes[i]), int(n[i])).proportion_ci(confidence, method="wilson")
            low[i], high[i] = ci.low, ci.high
    return low, high
