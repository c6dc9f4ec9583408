"""Byte-level models mixed in byte space, and bits per byte.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles": exact byte-level models share one output space, the 256 bytes, whatever their
tokenizers, so they can be averaged at every step.
"""

from __future__ import annotations

import math

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
