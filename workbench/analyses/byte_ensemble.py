"""Byte-level models mixed in byte space, bits per byte, and how sure a measured gain is.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles": exact byte-level models share one output space, the 256 bytes, whatever their
tokenizers, so they can be averaged at every step. Their released code
(``ByteEnsemble.prob_next_byte`` in facebookresearch/Exact-Byte-Level-Probabilities-from-Tokenized-LMs)
averages the members' next-byte probabilities with equal, fixed weights; nothing is learned.

- :class:`ByteLevelEnsemble`: the mixture as a byte-level model (distributions, streams, samples).
- :func:`mixture_logprob`: fixed weights, from stored member log-probabilities (no model calls);
  :func:`weight_grid` the weights a validation text chooses among.
- :func:`online_mixture_logprob`: weights learned online, byte by byte, from the bytes seen so
  far (Bayesian model averaging, or fixed share to follow a switching best member).
- :func:`bits_per_byte_intervals`: bits per byte and gains over a baseline with bootstrap
  confidence intervals over independent texts.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import xarray as xr

from .byte_level import ByteLevelModel, as_bytes, byte_distribution, sample_bytes


def bits_per_byte(model, text) -> float:
    """Bits per byte of ``text`` under a byte-level model or ensemble: ``-sum_i log2 P(x_i | x_<i) / n``.

    Dims: text of n bytes -> scalar.
    """
    data = as_bytes(text)
    if not data:
        raise ValueError("bits_per_byte needs a non-empty text.")
    ds = model.stream(data)
    return float(-ds["logprob"].sum() / (len(data) * math.log(2)))



def weight_grid(n_members: int, step: float = 0.1) -> np.ndarray:
    """Every weight vector on the simplex with coordinates multiple of ``step``: (grid, member), rows sum to 1."""
    if n_members < 1:
        raise ValueError(f"n_members must be >= 1, got {n_members}.")
    units = round(1 / step)
    if units < 1 or not math.isclose(units * step, 1.0):
        raise ValueError(f"step must divide 1 (0.1, 0.25, 0.5, ...), got {step}.")
    rows = [c for c in itertools.product(range(units + 1), repeat=n_members) if sum(c) == units]
    return np.array(rows, dtype=np.float64) / units


def mixture_logprob(member_logprob, weights) -> np.ndarray:
    """Log-probability of each byte under the byte-space mixture of the members.

    ``log P_ens(x_i | x_<i) = log sum_k w_k P_k(x_i | x_<i)`` ("Exact Byte-Level Probabilities
    from Tokenized Language Models for FIM-Tasks and Model Ensembles", Phan et al., 2024; the
    rule :class:`ByteLevelEnsemble` applies, here from stored member log-probabilities so that
    other weights need no new model calls). Weights are normalised. Dims: (member, pos) -> (pos,).
    """
    lp = np.asarray(member_logprob, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (lp.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {lp.shape[0]} non-negative numbers with a positive sum, got {weights!r}.")
    with np.errstate(divide="ignore"):
        terms = np.log(w / w.sum())[:, None] + lp
    top = terms.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    return safe + np.log(np.exp(terms - safe).sum(axis=0))


def online_mixture_logprob(member_logprob, share: float = 0.0) -> np.ndarray:
    """Log-probability of each byte under a mixture whose weights are learned online from the bytes before it.

    Weights start equal; after byte ``i`` each member's weight is multiplied by its probability of
    that byte and renormalised (the posterior over members), then a fraction ``share`` of the total
    is spread evenly over the members: the fixed-share forecaster (Herbster & Warmuth, "Tracking the
    Best Expert", 1998), which follows a best member that changes along the text. ``share=0`` is
    Bayesian model averaging: ``sum_i log P(x_i | x_<i) = log mean_k prod_i P_k(x_i | x_<i)``
    exactly, so it is never worse than the best member by more than ``log(K)`` in total; ``share=1``
    is the equal-weight mixture. One text: start a new call for each independent text.
    Written here because it is a few lines over stored log-probabilities. Dims: (member, pos) -> (pos,).
    """
    lp = np.asarray(member_logprob, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[0] < 1:
        raise ValueError(f"member_logprob must be (member, pos), got shape {lp.shape}.")
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}.")
    k = lp.shape[0]
    log_w = np.full(k, -math.log(k))
    spread = math.log(share / k) if share > 0 else -math.inf
    keep = math.log1p(-share) if share < 1 else -math.inf
    out = np.empty(lp.shape[1])
    for i in range(lp.shape[1]):
        terms = log_w + lp[:, i]
        top = terms.max()
        total = top + math.log(np.exp(terms - top).sum()) if np.isfinite(top) else -math.inf
        out[i] = total
        if not np.isfinite(total):
            continue  # no member gives this byte any probability: nothing to learn from it
        log_w = np.logaddexp(keep + terms - total, spread)
    return out


def bits_per_byte_intervals(nats, n_bytes, baseline: str | None = None, *, confidence: float = 0.95,
                            n_resamples: int = 10_000, seed: int = 0) -> xr.Dataset:
    """Bits per byte of several predictors over the same texts, with bootstrap confidence intervals.

    ``nats``: ``{name: (texts,)}`` total ``-log P`` of each text (nats) under each predictor;
    ``n_bytes``: ``(texts,)``. Bits per byte pool the texts: ``sum nats / (sum bytes * ln 2)``.
    Texts are the resampled units (bytes of one text are not independent), the same texts for
    every predictor (a paired bootstrap), by ``scipy.stats.bootstrap`` (BCa intervals; percentile
    ones where BCa is undefined, e.g. a predictor equal to the baseline on almost every text). With
    ``baseline`` (one of the names, or ``"best"``: the predictor with the lowest bits per byte
    among those not starting with ``"ensemble"``), also each predictor's relative gain
    ``1 - bpb / bpb_baseline`` with its interval; a gain whose interval excludes 0 is significant
    at ``1 - confidence``. Dims: -> (predictor,) ``bits_per_byte``, ``low``, ``high``, and
    ``gain``, ``gain_low``, ``gain_high``.
    """
    from scipy.stats import bootstrap

    names = list(nats)
    values = np.array([np.asarray(nats[n], dtype=np.float64) for n in names])
    weights = np.asarray(n_bytes, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != weights.shape[0] or weights.shape[0] < 2:
        raise ValueError(f"need at least two texts with the same count for every predictor and n_bytes; got "
                         f"{values.shape} nats and {weights.shape} n_bytes.")
    bpb = values.sum(axis=1) / (weights.sum() * math.log(2))
    members = [i for i, n in enumerate(names) if not n.startswith("ensemble")]
    base = None
    if baseline is not None:
        base = members[int(np.argmin(bpb[members]))] if baseline == "best" else names.index(baseline)

    def interval(statistic):
        if np.ptp(values, axis=1).max() == 0 and np.ptp(weights) == 0:
            return statistic(*values, weights, axis=-1), statistic(*values, weights, axis=-1)  # nothing varies
        for method in ("BCa", "percentile"):  # BCa is undefined where the statistic barely varies (a gain of ~0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = bootstrap((*values, weights), statistic, paired=True, vectorized=True, method=method,
                                confidence_level=confidence, n_resamples=n_resamples,
                                random_state=np.random.default_rng(seed))
            low, high = res.confidence_interval
            if np.isfinite(low) and np.isfinite(high):
                return low, high
        return low, high

    out = {"bits_per_byte": bpb, "low": np.empty(len(names)), "high": np.empty(len(names))}
    if base is not None:
        out.update(gain=1 - bpb / bpb[base], gain_low=np.empty(len(names)), gain_high=np.empty(len(names)))
    for i in range(len(names)):
        out["low"][i], out["high"][i] = interval(
            lambda *s, axis, i=i: s[i].sum(axis=axis) / (s[-1].sum(axis=axis) * math.log(2)))
        if base is not None:
            if i == base:
                out["gain_low"][i] = out["gain_high"][i] = 0.0
                continue
            out["gain_low"][i], out["gain_high"][i] = interval(
                lambda *s, axis, i=i: 1 - s[i].sum(axis=axis) / s[base].sum(axis=axis))
    return xr.Dataset({k: ("predictor", v) for k, v in out.items()}, coords={"predictor": names},
                      attrs={"confidence": confidence, "n_resamples": n_resamples, "n_texts": int(weights.shape[0]),
                             "n_bytes": int(weights.sum()), "baseline": "" if base is None else names[base],
                             "method": "paired bootstrap over texts (scipy.stats.bootstrap, BCa)"})


class ByteLevelEnsemble:
    """Several byte-level models, possibly with different vocabularies, mixed in byte space.

    Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks
    and Model Ensembles": once each model is an exact byte-level model, models with different
    tokenizers share one output space, the 256 bytes, and can be averaged at every step:
    ``P_ens(b | x) = sum_k w_k P_k(b | x)`` (weights normalised to 1; equal by default).
    Dims: -> (byte,) per prefix; :meth:`stream` -> (pos, byte) and (member, pos, byte).
    """

    def __init__(self, models, weights=None):
        self.models = list(models)
        if not self.models:
            raise ValueError("ByteLevelEnsemble needs at least one ByteLevelModel.")
        for m in self.models:
            if not isinstance(m, ByteLevelModel):
                raise TypeError(f"ByteLevelEnsemble takes ByteLevelModel objects, got {type(m).__name__}.")
        w = np.ones(len(self.models)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.models),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {len(self.models)} non-negative numbers with a positive sum, got {weights!r}."
            )
        self.weights = w / w.sum()
        self.members = [f"{i}:{m.name}" for i, m in enumerate(self.models)]

    @property
    def name(self) -> str:
        return "ensemble(" + ", ".join(m.name for m in self.models) + ")"

    @property
    def calls(self) -> int:
        """Model forward passes of all members."""
        return sum(m.calls for m in self.models)

    def next_byte_distribution(self, prefix) -> xr.DataArray:
        """``P_ens(b | prefix) = sum_k w_k P_k(b | prefix)``, a (byte,) DataArray summing to 1."""
        dists = [m.next_byte_distribution(prefix) for m in self.models]
        values = sum(w * d.values for w, d in zip(self.weights, dists))
        attrs = {
            "method": "ensemble",
            "model": self.name,
            "members": self.members,
            "weights": [float(w) for w in self.weights],
            "prefix": dists[0].attrs["prefix"],
            "impossible_bytes": [int(b) for b in np.flatnonzero(values == 0)],
        }
        return byte_distribution(values, "next_byte_probability", attrs)

    def stream(self, text, progress: bool | None = None) -> xr.Dataset:
        """The mixture's next-byte distribution at every cut point of ``text`` (see :meth:`ByteLevelModel.stream`)."""
        data = as_bytes(text)
        runs = [m.stream(data, progress=progress) for m in self.models]
        member_prob = np.stack([r["probability"].values for r in runs])
        probs = np.tensordot(self.weights, member_prob, axes=1)
        n = len(data)
        with np.errstate(divide="ignore"):
            logprob = np.log(probs[np.arange(n), np.frombuffer(data, dtype=np.uint8)])
        calls = sum(r.attrs["calls"] for r in runs)
        ds = xr.Dataset(
            {
                "probability": (("pos", "byte"), probs),
                "logprob": ("pos", logprob),
                "member_probability": (("member", "pos", "byte"), member_prob),
                "member_logprob": (("member", "pos"), np.stack([r["logprob"].values for r in runs])),
            },
            coords={"member": self.members, "weight": ("member", self.weights), **{k: runs[0].coords[k] for k in
                    ("pos", "byte", "char", "target", "target_char")}},
            attrs={
                "method": "ensemble",
                "model": self.name,
                "text": runs[0].attrs["text"],
                "n_bytes": n,
                "calls": calls,
                "calls_per_byte": calls / n,
            },
        )
        return ds

    def prefix_logprob(self, prefix) -> float:
        """``log P_ens(x) = sum_i log P_ens(x_i | x_<i)`` (the mixture defines its own byte process)."""
        data = as_bytes(prefix)
        return 0.0 if not data else float(self.stream(data)["logprob"].sum())

    def sample(self, prefix=b"", n_bytes: int = 32, seed: int = 0, temperature: float = 1.0) -> bytes:
        """Draw ``n_bytes`` bytes after ``prefix`` from the mixture's next-byte distribution (seeded)."""
        return sample_bytes(lambda data: self.next_byte_distribution(data).values, as_bytes(prefix), n_bytes, seed,
                             temperature)
