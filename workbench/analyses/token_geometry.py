"""The geometry of a prompt's token cloud, layer by layer.

Reproduces "The Geometry of Tokens in Internal Representations of Large Language Models"
(Viswanathan et al., 2025). For each prompt and depth, the cloud of that prompt's token vectors
(exact duplicates removed, their number recorded) is described by

- ``id``: intrinsic dimension by GRIDE at neighbour rank pairs ``n1 -> n2 = 2 n1`` (dim ``scale``
  holds ``n2``; ``n2 = 2`` is TwoNN, the paper's headline scale), with its standard error;
- ``overlap``: neighbourhood overlap between depth ``t`` and ``t + 1`` (share of each token's ``k``
  nearest neighbours kept; dim ``k``; the paper's headline is ``k = 1``);
- ``cosine_mean`` / ``cosine_std``: mean and spread of the pairwise cosine similarity.

The paper finds an ID peak in early-middle layers that rises when the prompt's tokens are
shuffled (:func:`shuffle_blocks`: the prompt cut into ``4**s`` blocks whose order is permuted,
``s = 0`` the original), and a positive relation between a prompt's ID and its mean next-token
cross-entropy (:func:`id_loss_correlation`: Spearman's rho with a bootstrap interval, scipy).

Estimators are in :mod:`workbench.analyses.intrinsic_dimension`. Everything here reads a run
(in memory or opened lazily from disk, one sample at a time), so a saved run is analysed
without the model. Depth ``t``: the residual entering block ``t``; the last depth is the
residual leaving the last block (:func:`residual_depths`).
Dims: (sample, pos, layer, d_model) -> (sample, depth[, scale | k]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import xarray as xr
from scipy import stats
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import intrinsic_dimension as idm
from .common import require


def residual_depths(run: xr.Dataset) -> xr.DataArray:
    """(sample, pos, depth, d_model): ``resid_pre`` of every layer, then ``resid_post`` of the last (if captured)."""
    pre = require(run, "resid_pre").rename(layer="depth")
    if "resid_post" in run:
        last = run["resid_post"].isel(layer=[-1]).rename(layer="depth")
        last = last.assign_coords(depth=[run.sizes["layer"]])
        pre = xr.concat([pre, last], "depth")
    return pre.transpose("sample", "pos", "depth", "d_model")


def shuffle_blocks(ids: Sequence[int], level: int, rng: np.random.Generator) -> list[int]:
    """Cut ``ids`` into ``min(4**level, len(ids))`` near-equal blocks and permute their order (level 0: unchanged)."""
    if level < 0:
        raise ValueError(f"shuffle level must be >= 0, got {level}.")
    ids = list(ids)
    n_blocks = min(4**level, len(ids))
    if n_blocks <= 1:
        return ids
    blocks = np.array_split(np.arange(len(ids)), n_blocks)
    return [ids[i] for b in rng.permutation(n_blocks) for i in blocks[b]]


def _scales(max_rank: int) -> list[int]:
    n2, out = 2, []
    while n2 <= max_rank:
        out.append(n2)
        n2 *= 2
    return out


def check_prompts(run: xr.Dataset, max_rank: int) -> None:
    """Every prompt must have more valid tokens than the largest neighbour rank; else say what to change."""
    lengths = run["valid"].sum("pos").values
    short = np.flatnonzero(lengths < max_rank + 1)
    if len(short):
        shortest = int(lengths.min())
        fit = max([n for n in _scales(max_rank) if n + 1 <= shortest], default=None)
        raise ValueError(
            f"{len(short)} prompt(s) (e.g. sample {int(short[0])}, {int(lengths[short[0]])} tokens) are shorter than "
            f"GRIDE up to neighbour rank {max_rank} needs ({max_rank + 1} distinct tokens): "
            + (f"pass max_rank={fit}, or use longer prompts." if fit else "use prompts of at least 3 tokens."))


def token_geometry(run: xr.Dataset, *, max_rank: int = 256, ks: Sequence[int] | None = None,
                   depths: Sequence[int] | None = None, workers: int | None = None,
                   progress: bool = True) -> xr.Dataset:
    """ID over scales, neighbourhood overlap and cosine statistics for every prompt and depth of ``run``.

    ``ks``: neighbour counts for the overlap (default 1, 2, 4, ..., up to 32 and ``max_rank``).
    ``workers``: prompts measured at once (default: the CPUs this process may use, at most 8), each
    on its own thread with NumPy's BLAS on one thread: the products, sorts and partitions release
    the GIL, and a prompt's clouds are too small for a multi-threaded product to pay (results do
    not depend on it).
    """
    states = residual_depths(run)
    n_depth = states.sizes["depth"]
    depths = list(range(n_depth)) if depths is None else sorted(set(depths))
    bad = [t for t in depths if not 0 <= t < n_depth]
    if bad:
        last = "the last block's output" if "resid_post" in run else "the input of the last block"
        raise IndexError(f"depths {bad} out of range: this run has depths 0..{n_depth - 1} "
                         f"(0 = embedding output, {n_depth - 1} = {last}).")
    check_prompts(run, max_rank)
    ks = sorted(set(ks)) if ks is not None else [k for k in (1, 2, 4, 8, 16, 32) if k <= max_rank]
    if ks[0] < 1 or ks[-1] > max_rank:
        raise ValueError(f"overlap ranks k must lie in 1..max_rank={max_rank}, got {ks}.")
    workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    scales = _scales(max_rank)
    n_s, n_t = run.sizes["sample"], len(depths)
    ids, errs, dist_n2 = (np.full((n_s, n_t, len(scales)), np.nan) for _ in range(3))
    overlap = np.full((n_s, n_t, len(ks)), np.nan)
    cos_mean, cos_std = np.full((n_s, n_t), np.nan), np.full((n_s, n_t), np.nan)
    n_points, n_dup = np.zeros((n_s, n_t), int), np.zeros((n_s, n_t), int)
    valid = run["valid"].values

    def measure(s: int) -> None:
        """Every depth of prompt ``s``, written into its own rows of the arrays above."""
        cloud = states.isel(sample=s).values[valid[s]]  # (pos, depth, d) in the run's dtype
        neighbours = {}  # depth -> neighbour indices, when every token vector there is distinct
        for i, t in enumerate(depths):
            points, n_dup[s, i] = idm.unique_points(np.asarray(cloud[:, t], np.float64))
            n_points[s, i] = len(points)
            if len(points) < 3:  # e.g. one token repeated: nothing to measure at this depth (NaN)
                continue
            gram = idm.centred_gram(points)  # one product for the cosines and the neighbours
            cos_mean[s, i], cos_std[s, i] = idm.cosine_similarity_stats(points, gram=gram)
            top = min(max(max_rank, ks[-1]), len(points) - 1)
            dist, idx = idm.neighbour_distances(points, top, n_indices=min(ks[-1], top), gram=gram)
            est = idm.gride_scales(points, max_rank=max_rank, distances=dist[:, : min(max_rank, top)])
            m = len(est["n2"])
            ids[s, i, :m], errs[s, i, :m], dist_n2[s, i, :m] = est["id"], est["id_error"], est["scale"]
            if n_dup[s, i] == 0:
                neighbours[t] = idx
            if i and depths[i - 1] == t - 1:  # overlap needs the same points at both depths
                if t in neighbours and t - 1 in neighbours and len(points) > ks[-1]:
                    overlap[s, i - 1] = idm.overlap_from_neighbours(neighbours[t - 1], neighbours[t], ks)
                else:  # duplicates at either depth: the tokens distinct at both
                    a, b = np.asarray(cloud[:, t - 1], np.float64), np.asarray(cloud[:, t], np.float64)
                    keep = _distinct_rows(a) & _distinct_rows(b)
                    if keep.sum() > ks[-1]:
                        overlap[s, i - 1] = idm.overlap_curve(a[keep], b[keep], ks)

    with threadpool_limits(1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool, \
            tqdm(total=n_s, desc="token geometry", disable=not progress) as bar:
        for done in as_completed([pool.submit(measure, s) for s in range(n_s)]):
            done.result()  # raises what measuring that prompt raised
            bar.update()
    coords = {"sample": run["sample"].values, "depth": depths, "scale": scales, "k": ks}
    ds = xr.Dataset(
        {
            "id": (("sample", "depth", "scale"), ids, {"long_name": "intrinsic dimension (GRIDE)"}),
            "id_error": (("sample", "depth", "scale"), errs),
            "scale_distance": (("sample", "depth", "scale"), dist_n2,
                               {"long_name": "mean distance of the n1-th and n2-th neighbours"}),
            "overlap": (("sample", "depth", "k"), overlap,
                        {"long_name": "share of k nearest neighbours kept at depth + 1"}),
            "cosine_mean": (("sample", "depth"), cos_mean, {"long_name": "mean pairwise cosine similarity"}),
            "cosine_std": (("sample", "depth"), cos_std),
            "n_points": (("sample", "depth"), n_points, {"long_name": "distinct token vectors"}),
            "n_duplicates": (("sample", "depth"), n_dup, {"long_name": "duplicate token vectors removed"}),
        },
        coords=coords,
        attrs={"analysis": "token_geometry.token_geometry", "max_rank": max_rank, "model": run.attrs.get("model", ""),
               "scale_meaning": "n2 of the GRIDE rank pair n1 = n2 / 2 -> n2 (n2 = 2: TwoNN)",
               "depth_meaning": "t < n_layers: resid_pre of block t; t = n_layers: resid_post of the last block"},
    )
    for name in ("sample_text", "text"):
        if name in run.coords and run.coords[name].dims == ("sample",):
            ds = ds.assign_coords({name: run.coords[name]})
    return ds


def _distinct_rows(x: np.ndarray) -> np.ndarray:
    """True for rows that occur exactly once in ``x``."""
    _, inverse, counts = np.unique(x, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] == 1


def prompt_loss(run: xr.Dataset) -> xr.DataArray:
    """Mean next-token cross-entropy of each prompt (nats), from the ``logits`` probe."""
    logprob = require(run, "next_token_logprob", "logits")
    return (-logprob.where(run["valid"])).mean("pos", skipna=True).rename("mean_cross_entropy")


def id_loss_correlation(geometry: xr.Dataset, loss: xr.DataArray, *, scale: int = 2, n_resamples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
    """Per depth: Spearman's rho between prompts' ID (at ``scale``) and their mean loss, with a bootstrap interval.

    The interval resamples prompts (paired; scipy's percentile bootstrap, which stays defined when every
    resample gives the same rho); needs at least 4 prompts.
    """
    if scale not in geometry["scale"].values:
        raise ValueError(f"scale {scale} not computed; available: {list(geometry['scale'].values)}.")
    if geometry.sizes["sample"] < 4:
        raise ValueError("a rank correlation over prompts needs at least 4 prompts.")
    y = np.asarray(loss.values, np.float64)
    rho, low, high = [], [], []
    for t in geometry["depth"].values:
        x = geometry["id"].sel(depth=t, scale=scale).values
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 4 or np.ptp(x[ok]) == 0:
            rho.append(np.nan), low.append(np.nan), high.append(np.nan)
            continue
        r = stats.spearmanr(x[ok], y[ok]).statistic
        ci = stats.bootstrap((x[ok], y[ok]), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                             vectorized=False, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                             random_state=np.random.default_rng(seed)).confidence_interval
        rho.append(r), low.append(ci.low), high.append(ci.high)
    return xr.Dataset({"spearman": ("depth", rho), "ci_low": ("depth", low), "ci_high": ("depth", high)},
                      coords={"depth": geometry["depth"].values},
                      attrs={"scale": scale, "confidence": confidence, "n_resamples": n_resamples,
                             "prompts": geometry.sizes["sample"], "analysis": "token_geometry.id_loss_correlation"})
