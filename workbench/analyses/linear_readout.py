"""Least-squares readouts from streamed sufficient statistics (float64), whatever the number of tokens.

One :class:`ReadoutStats` holds, for one feature set, ``n``, ``sum x``, ``X^T X`` and, for
each target column, ``sum y``, ``sum y^2`` and ``X^T y``; one-hot class targets keep their
per-class sums of ``x`` (built with ``index_add``, never a dense one-hot matrix). Memory is
O(d^2 + d * targets), not O(tokens). A fit solves the centred normal equations; the
residual sum of squares of any fit is evaluated on any statistics (in-sample or held out):

    RSS = S_yy - 2 W^T S_xy + W^T S_xx W + n (ybar - b - W^T xbar)^2

with ``S`` centred on those statistics' own means (no cancellation from large means).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


class UnstableFitWarning(UserWarning):
    pass


@dataclass
class Fit:
    """``y_hat = x @ weight + bias``; ``weight`` (d, m), ``bias`` (m,); how it was solved."""

    weight: np.ndarray
    bias: np.ndarray
    solver: str
    rank: int


class ReadoutStats:
    """Sufficient statistics of least-squares readouts from ``d`` features.

    ``n_targets`` scalar target columns and ``label_sets`` one-hot targets of ``n_classes``
    classes each (label -1 = no class: an all-zero one-hot row). Target columns are the
    scalars first, then one block of ``n_classes`` per label set; all share one ``X^T X``.
    """

    def __init__(self, d: int, n_targets: int = 0, n_classes: int = 0, label_sets: int = 1):
        self.d, self.n_targets, self.n_classes, self.label_sets = d, n_targets, n_classes, label_sets
        width = n_targets + n_classes * label_sets
        self.n = 0
        self.sx = torch.zeros(d, dtype=torch.float64)
        self.sxx = torch.zeros(d, d, dtype=torch.float64)
        self.sy = torch.zeros(width, dtype=torch.float64)
        self.syy = torch.zeros(width, dtype=torch.float64)
        self.sxy = torch.zeros(d, width, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """Accumulate features ``x`` (n, d), scalar targets ``y`` (n, n_targets), class ``labels``
        (n,) or (n, label_sets)."""
        x = x.detach().to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx.addmm_(x.T, x)
        if self.n_targets:
            y = y.detach().to("cpu", torch.float64).reshape(x.shape[0], self.n_targets)
            self.sy[: self.n_targets] += y.sum(0)
            self.syy[: self.n_targets] += (y * y).sum(0)
            self.sxy[:, : self.n_targets].addmm_(x.T, y)
        if self.n_classes:
            labels = labels.detach().cpu().reshape(x.shape[0], self.label_sets)
            for block in range(self.label_sets):
                keep = labels[:, block] >= 0
                cls = labels[keep, block] + self.n_targets + block * self.n_classes
                counts = torch.bincount(cls, minlength=self.sy.shape[0]).to(torch.float64)
                self.sy += counts
                self.syy += counts  # y in {0, 1}: y^2 = y
                self.sxy.index_add_(1, cls, x[keep].T)

    def _centred(self):
        n = self.n
        mx, my = self.sx / n, self.sy / n
        sxx = self.sxx - n * torch.outer(mx, mx)
        sxy = self.sxy - n * torch.outer(mx, my)
        syy = self.syy - n * my * my
        return mx.numpy(), my.numpy(), sxx.numpy(), sxy.numpy(), syy.numpy()

    def fit(self, ridge: float = 0.0) -> Fit:
        """Ordinary least squares with intercept (``ridge`` > 0: ridge on the centred features).

        ``ridge = 0`` solves the normal equations by Cholesky when ``X^T X`` is well
        conditioned (condition number below 1e10), else by ``numpy.linalg.lstsq``, which
        returns the minimum-norm solution when ``X^T X`` is singular; the choice is recorded
        as ``solver``, so a singular feature matrix never crashes or produces NaN.
        """
        if self.n < 2:
            raise ValueError(f"a least-squares fit needs at least 2 tokens; these statistics hold {self.n}.")
        mx, my, sxx, sxy, _ = self._centred()
        if ridge > 0:
            lam = ridge * np.trace(sxx) / self.d  # scale-free: ridge is relative to the mean feature variance
            weight = np.linalg.solve(sxx + lam * np.eye(self.d), sxy)
            solver, rank = f"ridge(lambda={ridge} x mean feature variance)", self.d
        else:
            weight = _cholesky_solve(sxx, sxy)
            if weight is not None:
                solver, rank = "cholesky", self.d
            else:  # singular or too ill-conditioned for the normal equations
                weight, _, rank, _ = np.linalg.lstsq(sxx, sxy, rcond=None)
                solver = "lstsq" if rank == self.d else f"lstsq (min-norm; X^T X rank {rank} < {self.d})"
        bias = my - mx @ weight
        return Fit(weight, bias, solver, int(rank))

    def residual_sum_of_squares(self, fit: Fit) -> np.ndarray:
        """RSS of each target column of ``fit`` on these statistics, (targets,)."""
        mx, my, sxx, sxy, syy = self._centred()
        w = fit.weight
        offset = my - fit.bias - mx @ w
        rss = syy - 2 * (w * sxy).sum(0) + ((sxx @ w) * w).sum(0) + self.n * offset**2
        return np.maximum(rss, 0.0)

    def total_sum_of_squares(self) -> np.ndarray:
        """Sum of squared deviations of each target column from its mean, (targets,)."""
        return np.maximum(self._centred()[4], 0.0)


def _cholesky_solve(a: np.ndarray, b: np.ndarray, max_condition: float = 1e10) -> np.ndarray | None:
    """``a^-1 b`` for symmetric positive-definite ``a``, or None if it is (numerically) singular."""
    scale = np.sqrt(np.clip(np.diag(a), 1e-300, None))
    scaled = a / scale[:, None] / scale[None, :]  # unit diagonal: the condition test is scale-free
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(scaled))
    if info.item() != 0:
        return None
    diag = factor.diagonal()
    if float((diag.max() / diag.min()) ** 2) > max_condition:
        return None
    solved = torch.cholesky_solve(torch.from_numpy(b / scale[:, None]), factor).numpy()
    return solved / scale[:, None]


def check_enough_tokens(n: int, d: int, factor: int = 4, what: str = "the fit") -> None:
    """Warn when fewer than ``factor x d`` tokens back a d-feature least-squares fit."""
    if n < factor * d:
        warnings.warn(
            f"{what} uses {n} tokens for {d} features: fewer than {factor} x d_model = {factor * d}, so the "
            f"in-sample fit is optimistic and unstable. Pass more text (at least {factor * d} tokens; "
            f"{20 * d}+ for stable held-out numbers).",
            UnstableFitWarning,
            stacklevel=3,
        )
