"""Intrinsic dimension, neighbourhood overlap and cosine statistics of point clouds (NumPy, float64).

Used per prompt and layer by :mod:`workbench.analyses.token_geometry` ("The Geometry of Tokens in
Internal Representations of Large Language Models", Viswanathan et al., 2025), which estimates ID
with GRIDE as implemented in dadapy. dadapy 0.3.4 pins numpy<2 and jax, so it cannot be a
dependency here; the estimator is small and is written out below, and
``tests/test_intrinsic_dimension.py`` checks it against dadapy's own numbers on the same points
(computed in a separate environment; the command is in that test's docstring).

GRIDE (Denti et al., 2022, "The generalized ratios intrinsic dimension estimator", Sci. Rep. 12):
for each point, ``mu = r_{n2} / r_{n1}`` (distances to its n1-th and n2-th nearest neighbours,
here ``n2 = 2 n1``) has the density

    f(mu | d) = d (mu^d - 1)^(n2 - n1 - 1) / (B(n2 - n1, n1) mu^((n2 - 1) d + 1)),   mu > 1,

and the ID is the ``d`` that maximises the likelihood over all points with ``N log d`` replaced by
``(N - 1) log d`` (Newton's method on its concave log-likelihood; for n1 = 1, n2 = 2 the closed form ``(N - 1) / sum(log mu)``,
the unbiased version of TwoNN's maximum-likelihood estimate, which dadapy uses too). The standard
error is ``1 / sqrt(Fisher information)`` at the estimate. Larger ``n1`` probes the cloud
at a larger scale (``scale``: the mean distance of the neighbours involved) and is less sensitive to noise.

Shapes: ``points`` (n, d) -> scalars or (n, k) neighbour arrays.
"""

from __future__ import annotations

import numpy as np


def unique_points(points: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows with exact duplicates removed (first occurrences, original order) and how many were removed.

    Rows are compared by their bytes (``-0.0`` counted as ``0.0``): a dictionary pass, several times
    faster than ``np.unique(axis=0)``, which sorts the rows.
    """
    points = np.asarray(points)
    first: dict[bytes, int] = {}
    for i, row in enumerate(np.ascontiguousarray(points + 0) if points.dtype.kind == "f" else points):
        first.setdefault(row.tobytes(), i)
    keep = np.fromiter(first.values(), dtype=np.intp, count=len(first))
    return points[keep], len(points) - len(keep)


def _check(points: np.ndarray, max_rank: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be (n_points, dims), got shape {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values: drop padding positions first.")
    if len(points) <= max_rank:
        raise ValueError(f"{len(points)} points cannot have {max_rank} neighbours each: give prompts with at least "
                         f"{max_rank + 1} distinct tokens or lower max_rank.")
    return points


def centred_gram(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix ``c c^T`` of the centred points ``c = x - mean(x)``, and the mean.

    :func:`neighbour_distances` and :func:`cosine_similarity_stats` both read it, so a cloud needs
    one product for both. (BLAS's symmetric ``dsyrk`` plus mirroring its triangle took 2.5x as long
    as the general product on 512 x 576 clouds here.)
    """
    x = np.asarray(points, dtype=np.float64)
    mean = x.mean(0)
    c = x - mean
    return c @ c.T, mean


def neighbour_distances(points: np.ndarray, max_rank: int, *, n_indices: int | None = None,
                        gram: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances (n, max_rank) to each point's 1st..max_rank-th nearest other point, ascending, and the
    indices (n, n_indices; default max_rank) of its nearest others, in the same order.

    Squared distances come from the Gram matrix of the *centred* points, ``|a|^2 + |b|^2 - 2 a.b``
    (:func:`centred_gram`, or ``gram`` when the caller has it; about 7x faster than
    ``scipy.spatial.distance.cdist`` for 512 x 576 clouds). The subtraction loses ``~eps |x|^2``
    absolutely, ``|x|`` measured from the centroid: centring first keeps that at float64 rounding of
    the cloud's own spread, so a neighbour distance r has relative error ``~1e-16 (spread / r)^2``
    (1e-8 at r = 1e-4 spread; exact duplicates may come out as tiny positive distances rather than 0,
    hence :func:`unique_points`). Only the max_rank smallest distances of each row are sorted
    (``np.partition`` first), and only the n_indices nearest are ranked by index: sorting values is
    several times faster than sorting indices.
    """
    x = _check(points, max_rank)
    n_indices = max_rank if n_indices is None else n_indices
    if not 1 <= n_indices <= len(x) - 1:
        raise ValueError(f"n_indices must lie in 1..{len(x) - 1}, got {n_indices}.")
    d2 = (gram or centred_gram(x))[0] * -2.0
    squared_norms = -0.5 * np.diagonal(d2)
    d2 += squared_norms[:, None]
    d2 += squared_norms[None, :]
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, np.inf)
    nearest = np.partition(d2, max_rank - 1, axis=1)[:, :max_rank] if max_rank < len(x) - 1 else d2.copy()
    nearest.sort(axis=1)
    idx = np.argpartition(d2, n_indices - 1, axis=1)[:, :n_indices] if n_indices < len(x) - 1 else \
        np.broadcast_to(np.arange(len(x)), d2.shape).copy()
    idx = np.take_along_axis(idx, np.take_along_axis(d2, idx, 1).argsort(1, kind="stable"), 1)
    return np.sqrt(nearest[:, :max_rank]), idx[:, :n_indices]


def gride(distances: np.ndarray, n1: int, n2: int | None = None, d_bounds=(1e-3, 1e3)) -> tuple[float, float]:
    """GRIDE maximum-likelihood ID and its standard error from neighbour distances (n, >= n2).

    ``mu_i = r_{i,n2} / r_{i,n1}``; the likelihood of the module docstring is maximised on ``d_bounds``
    by safeguarded Newton steps (:func:`_maximise_likelihood`; dadapy bisects the derivative to 1e-7:
    the two agree to ~1e-8), for n1 = 1, n2 = 2 in closed form, ``(N - 1) / sum(log mu)``. Error: ``1 / sqrt(I(d))`` with
    dadapy's observed Fisher information ``I(d) = N / d^2 + (n2 - n1 - 1) sum (log mu)^2 mu^-d /
    (1 - mu^-d)^2``, summed here over the ratios kept by the filter below (dadapy sums over all of
    them; the two agree unless the filter drops some).

    Two filters as in dadapy (so the numbers agree): a ratio of exactly 1 (tied distances) is
    nudged above 1, and ratios beyond ``median + 20 (q95 - median)`` (points sitting on top of
    each other at the smaller rank) are left out.
    """
    n2 = 2 * n1 if n2 is None else n2
    if not 1 <= n1 < n2 <= distances.shape[1]:
        raise ValueError(f"need 1 <= n1 < n2 <= {distances.shape[1]} (the neighbours given), got n1={n1}, n2={n2}.")
    mu = distances[:, n2 - 1] / distances[:, n1 - 1]
    if not np.isfinite(mu).all():
        raise ValueError("zero neighbour distances: the cloud holds duplicate points (remove them with unique_points).")
    mu[mu == 1] += 10 * np.finfo(np.float64).eps
    q95, q50 = np.percentile(mu, [95, 50])
    log_mu = np.log(mu[mu < q50 + 20 * (q95 - q50)])
    n = len(log_mu)
    if n < 2:
        raise ValueError("fewer than 2 usable neighbour-distance ratios: the cloud is degenerate.")
    a, total = n2 - n1 - 1, log_mu.sum()
    d = min(max((n - 1) / total, d_bounds[0]), d_bounds[1])  # TwoNN: the closed form, and Newton's start
    if a:
        d = _maximise_likelihood(log_mu, total, n, n2, a, d, d_bounds)
    e = np.exp(-d * log_mu)
    information = n / d**2 + a * (log_mu**2 * e / (1 - e) ** 2).sum()
    return float(d), float(1 / np.sqrt(information))


def _maximise_likelihood(log_mu, total, n, n2, a, d, d_bounds) -> float:
    """The GRIDE likelihood's maximum on ``d_bounds`` by Newton's method on its derivative, kept inside a
    bracket that bisection shrinks whenever a Newton step would leave it.

    The log-likelihood ``(n - 1) log d + a sum log(mu^d - 1) - ((n2 - 1) d + 1) sum log mu`` (+ const)
    is concave in d (second derivative ``-(n - 1)/d^2 - a sum (log mu)^2 mu^-d / (1 - mu^-d)^2``), so its
    derivative falls through zero once: Newton converges in a handful of vectorised steps, where a
    derivative-free scalar search (scipy's bounded Brent, used before) took ~40 evaluations with
    Python overhead each, 3 ms a cloud. Result to ~1e-12 relative.
    """
    def slope(d):
        e = np.exp(-d * log_mu)
        ratio = e / (1 - e)
        return ((n - 1) / d + a * (total + (log_mu * ratio).sum()) - (n2 - 1) * total,
                -(n - 1) / d**2 - a * (log_mu**2 * ratio / (1 - e)).sum())

    lo, hi = d_bounds
    if slope(hi)[0] >= 0:
        return float(hi)
    if slope(lo)[0] <= 0:
        return float(lo)
    for _ in range(200):
        g, h = slope(d)
        if g > 0:
            lo = d
        else:
            hi = d
        step = d - g / h
        new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new - d) <= 1e-13 * d or hi - lo <= 1e-13 * hi:
            return float(new)
        d = new
    return float(d)


def gride_scales(points: np.ndarray, max_rank: int = 256, *, distances: np.ndarray | None = None) -> dict:
    """GRIDE at n1 = 1, 2, 4, ... with n2 = 2 n1 <= min(max_rank, n_points - 1).

    Returns arrays ``n1``, ``n2``, ``id``, ``id_error``, ``scale`` (the mean distance to the n1-th and
    n2-th neighbours, dadapy's ``rs``) and ``n_points``. ``points`` must be free of duplicates (:func:`unique_points`);
    ``distances``: precomputed :func:`neighbour_distances` of the same points (optional).
    """
    points = np.asarray(points)
    if len(points) < 3:
        raise ValueError(f"{len(points)} distinct points: GRIDE needs at least 3; give prompts with at least 3 "
                         "distinct tokens.")
    top = min(max_rank, len(points) - 1)
    if distances is None:
        if len(unique_points(points)[0]) != len(points):
            raise ValueError("points contain exact duplicates (zero distances): remove them with unique_points first.")
        distances, _ = neighbour_distances(points, top)
    out = {k: [] for k in ("n1", "n2", "id", "id_error", "scale")}
    n1 = 1
    while 2 * n1 <= top:
        d, err = gride(distances, n1, 2 * n1)
        scale = float(distances[:, [n1 - 1, 2 * n1 - 1]].mean())
        for key, value in zip(out, (n1, 2 * n1, d, err, scale)):
            out[key].append(value)
        n1 *= 2
    return {**{k: np.asarray(v) for k, v in out.items()}, "n_points": len(points)}


def overlap_from_neighbours(idx_a: np.ndarray, idx_b: np.ndarray, ks) -> np.ndarray:
    """Mean share of each point's k nearest neighbours common to two neighbour-index arrays (n, >= max k)."""
    out = []
    for k in ks:
        a, b = idx_a[:, :k], idx_b[:, :k]
        shared = (a[:, :, None] == b[:, None, :]).any(2).sum(1)
        out.append(float(shared.mean() / k))
    return np.asarray(out)


def overlap_curve(a: np.ndarray, b: np.ndarray, ks) -> np.ndarray:
    """Neighbourhood overlap for each k in ``ks``: the same points (rows correspond) in two representations."""
    ks = [int(k) for k in ks]
    if len(a) != len(b):
        raise ValueError(f"the two clouds must hold the same points in the same order; got {len(a)} and {len(b)} rows.")
    if min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {ks}.")
    top = max(ks)
    if top >= len(a):
        raise ValueError(f"k = {top} needs more than {len(a)} points: lower k.")
    return overlap_from_neighbours(neighbour_distances(a, top)[1], neighbour_distances(b, top)[1], ks)


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 1) -> float:
    """Mean over points of |kNN_a(i) ∩ kNN_b(i)| / k (self excluded): 1 = every neighbourhood kept."""
    return float(overlap_curve(a, b, [k])[0])


def cosine_similarity_stats(points: np.ndarray, *, gram: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> tuple[float, float]:
    """Mean and standard deviation of the cosine similarity over all pairs i < j.

    The uncentred dot products come from the centred Gram matrix (:func:`centred_gram`, or ``gram``):
    ``x_i . x_j = c_i . c_j + c_i . m + c_j . m + m . m``; the pair sums from whole-matrix sums minus
    the diagonal (no pair index arrays).
    """
    x = np.asarray(points, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("cosine statistics need at least 2 points.")
    g_c, mean = gram or centred_gram(x)
    v = (x - mean) @ mean
    dots = g_c + v[:, None]
    dots += v[None, :]
    dots += mean @ mean
    norms = np.sqrt(np.maximum(np.diagonal(dots), 0.0))
    if (norms == 0).any():
        raise ValueError("a zero vector has no direction: cosine similarity is undefined for it.")
    dots /= norms[:, None]
    dots /= norms[None, :]
    n_pairs = len(x) * (len(x) - 1) / 2
    diagonal = np.diagonal(dots)
    mean_cos = (dots.sum() - diagonal.sum()) / 2 / n_pairs
    dots -= mean_cos  # spread about the mean, not E[c^2] - E[c]^2 (which cancels when cosines are all near 1)
    variance = ((dots * dots).sum() - (diagonal * diagonal).sum()) / 2 / n_pairs
    return float(mean_cos), float(np.sqrt(max(variance, 0.0)))
