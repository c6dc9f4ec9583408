"""Lines of thought: the last token's hidden state across layers as a trajectory (Sarfati et al.).

"Lines of Thought in Large Language Models" (Sarfati, Liu, Boullé, Earls, 2024): feed many
fixed-length chunks of real text; the last token's residual stream ``x_t`` at layer ``t = 0..L``
traces a trajectory. Claims reproduced here:

1. Low dimension. Per layer, the ensemble ``X_t`` (N trajectories x d) centred on its mean,
   ``X_t - mu_t = U S V^T``, has most of its variance in a few leading singular directions
   (:func:`trajectory_svd`: ``explained = s_k^2 / sum s^2``, components for 90% / 99%).
2. The output lives there. Truncating the last layer's states to the top-K directions,
   ``x^K = mu + (x - mu) V_K V_K^T``, and unembedding (final norm + ``W_U``, through
   :func:`workbench.probes.lens.lens_logits`) gives ``KL(p(x) || p(x^K)) -> 0`` as K grows (GPT-2
   medium: ~256 of 1024 components) (:func:`truncation_kl`).
3. A linear drift + noise model: ``x_{t+1} = x_t + A_t x_t + b_t + sigma_t eps`` with ``A_t, b_t``
   fitted (ridge least squares) on training trajectories predicts held-out next-layer states
   better than "no update" and "mean update" (:func:`fit_linear_drift`).

Input ``states``: (trajectory, layer, d_model), ``layer`` 0 = the residual entering block 0,
``layer`` l = leaving block l-1 (n_layers + 1 states); numpy, xarray or dask-backed xarray (one
layer is loaded at a time). All statistics are float64 (numpy / scipy).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import xarray as xr

from ..numerics import kl_from_logprobs, log_softmax
from ..probes.lens import lens_logits

DIMS = ("trajectory", "layer", "d_model")
QUANTILES = (0.1, 0.5, 0.9)


def chunk_windows(token_ids: list[int], length: int, n: int | None = None) -> list[list[int]]:
    """The first ``n`` (default: all) non-overlapping chunks of ``length`` tokens of a token stream."""
    if length < 1:
        raise ValueError(f"length must be >= 1 (got {length}).")
    available = len(token_ids) // length
    if available == 0 or (n is not None and n > available):
        raise ValueError(
            f"a stream of {len(token_ids)} tokens holds {available} chunk(s) of {length} tokens, "
            f"{'fewer than the ' + str(n) + ' asked for' if n else 'not even one'}: concatenate more text "
            "(e.g. more workbench.corpus.paragraphs()), shorten length, or ask for fewer chunks.")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 (got {n}).")
    ids = list(token_ids)
    return [ids[i * length:(i + 1) * length] for i in range(available if n is None else n)]


def _states(states, min_trajectories: int = 4) -> xr.DataArray:
    """``states`` as a (trajectory, layer, d_model) DataArray, checked (shape, count, finite) before any work."""
    da = states if isinstance(states, xr.DataArray) else xr.DataArray(np.asarray(states), dims=DIMS)
    if da.ndim != 3:
        raise ValueError(f"states must be (trajectory, layer, d_model); got shape {da.shape}.")
    if set(da.dims) != set(DIMS):
        raise ValueError(f"states must have dims {DIMS}; got {da.dims}: rename them (DataArray.rename).")
    da = da.transpose(*DIMS)
    if da.sizes["trajectory"] < min_trajectories:
        raise ValueError(f"{da.sizes['trajectory']} trajectories; this needs at least {min_trajectories}: "
                         "use more text chunks (chunk_windows).")
    if not bool(np.isfinite(da).all()):
        raise ValueError("states hold non-finite values (nan / inf): recapture them, or drop those trajectories.")
    return da


def _layer_index(da: xr.DataArray, layer: int) -> int:
    n = da.sizes["layer"]
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range for {n} states (valid: {-n}..{n - 1}).")
    return layer % n


def _layer(da: xr.DataArray, i: int) -> np.ndarray:
    return np.asarray(da.isel(layer=i).values, dtype=np.float64)


def _layer_coord(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da["layer"].values) if "layer" in da.coords else np.arange(da.sizes["layer"])


def trajectory_svd(states) -> xr.Dataset:
    """Per layer, the singular spectrum of the centred ensemble ``X_t - mu_t``.

    Returns ``singular_value``, ``explained_variance_ratio`` and ``cumulative_explained``
    (layer, component); ``components_90`` / ``components_99`` (smallest k whose cumulative
    ratio reaches 0.9 / 0.99), ``total_variance`` (sum of per-dimension variances, ddof=1)
    and ``mean_norm`` ``||mu_t||`` (layer).
    """
    da = _states(states)
    n, n_layer, d = (da.sizes[k] for k in DIMS)
    k = min(n, d)
    sv, evr = np.zeros((n_layer, k)), np.full((n_layer, k), np.nan)
    mean_norm, total = np.zeros(n_layer), np.zeros(n_layer)
    for i in range(n_layer):
        x = _layer(da, i)
        mu = x.mean(0)
        sv[i] = scipy.linalg.svdvals(x - mu)[:k]
        energy = (sv[i] ** 2).sum()
        if energy > 0:
            evr[i] = sv[i] ** 2 / energy
        mean_norm[i], total[i] = np.linalg.norm(mu), energy / (n - 1)
    cum = np.cumsum(evr, axis=1)

    def needed(level):
        return np.where(np.isnan(cum[:, -1]), 0, (cum < level - 1e-9).sum(1) + 1)

    return xr.Dataset(
        {
            "singular_value": (("layer", "component"), sv),
            "explained_variance_ratio": (("layer", "component"), evr),
            "cumulative_explained": (("layer", "component"), cum),
            "components_90": ("layer", needed(0.9)),
            "components_99": ("layer", needed(0.99)),
            "total_variance": ("layer", total),
            "mean_norm": ("layer", mean_norm),
        },
        coords={"layer": _layer_coord(da), "component": np.arange(1, k + 1)},
        attrs={"analysis": "trajectory_svd", "n_trajectories": n, "d_model": d},
    )


def truncation_kl(handle, states, ranks: list[int], layer: int = -1, batch_size: int = 64) -> xr.Dataset:
    """``KL(p(x) || p(x^K))`` for ``x^K = mu + (x - mu) V_K V_K^T`` at one layer (default: the last).

    ``V_K``: top-K right singular vectors of that layer's centred ensemble; ``p`` = softmax of the
    model's own final norm + unembedding. K beyond the ensemble's ``min(N, d)`` singular vectors
    uses all of them (the centred states lie in their span: exact); ``components_used`` records it.
    Returns ``kl`` (rank, trajectory); ``kl_mean``, ``top1_agreement`` (fraction of trajectories
    whose argmax token is unchanged), ``explained`` (variance fraction in the top K) (rank);
    ``kl_quantile`` (rank, quantile).
    """
    da = _states(states)
    n, _, d = (da.sizes[k] for k in DIMS)
    i = _layer_index(da, layer)
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1 or max(ranks) > d:
        raise ValueError(f"ranks must be in 1..d_model = {d} (got {ranks}).")
    if handle.d_model != d:
        raise ValueError(f"states have d_model {d}, but {handle.name} has {handle.d_model}: wrong model for these states.")
    original = np.asarray(da.isel(layer=i).values)  # the states as captured: the "full" output
    x = original.astype(np.float64)
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    explained = np.cumsum(s ** 2) / max((s ** 2).sum(), np.finfo(float).tiny)
    used = [min(r, len(s)) for r in ranks]
    kl, agree = np.zeros((len(ranks), n)), np.zeros((len(ranks), n), dtype=bool)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            logp = log_softmax(lens_logits(handle, torch.as_tensor(original[rows])))
            centred = x[rows] - mu
            for j, k in enumerate(used):
                v = vt[:k]
                trunc = torch.as_tensor(mu + (centred @ v.T) @ v)
                logq = log_softmax(lens_logits(handle, trunc))
                kl[j, rows] = kl_from_logprobs(logp, logq).double().cpu().numpy()
                agree[j, rows] = (logp.argmax(-1) == logq.argmax(-1)).cpu().numpy()
    kl = np.maximum(kl, 0.0)  # rounding can leave -1e-9
    return xr.Dataset(
        {
            "kl": (("rank", "trajectory"), kl),
            "kl_mean": ("rank", kl.mean(1)),
            "kl_quantile": (("rank", "quantile"), np.quantile(kl, QUANTILES, axis=1).T),
            "top1_agreement": ("rank", agree.mean(1)),
            "explained": ("rank", explained[np.array(used) - 1]),
            "components_used": ("rank", np.array(used)),
        },
        coords={"rank": ranks, "quantile": list(QUANTILES)},
        attrs={"analysis": "truncation_kl", "model": handle.name, "layer": int(_layer_coord(da)[i]),
               "kl": "KL(full || truncated), nats", "n_trajectories": n},
    )


def _ridge(z: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin ||z W - y||^2 + lam ||W||^2`` with ``lam = ridge * mean eigenvalue of z^T z`` (scale-free)."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = ridge * (s ** 2).sum() / z.shape[1]
    if lam == 0:
        return np.linalg.pinv(z) @ y
    return vt.T @ ((s / (s ** 2 + lam))[:, None] * (u.T @ y))


def fit_linear_drift(states, train_fraction: float = 0.8, ridge: float = 1e-3, seed: int = 0,
                     rank: int | None = None) -> xr.Dataset:
    """Fit ``x_{t+1} - x_t = A_t x_t + b_t`` per transition on training trajectories; score held-out ones.

    ``ridge`` is relative to the mean eigenvalue of the (centred) features' Gram matrix; ``rank``
    restricts ``x_t`` to the top-``rank`` principal directions of the training states (well-posed
    when N < d). Scores on held-out trajectories, for the fit and the baselines ``no_update``
    (``x_{t+1} = x_t``) and ``mean_update`` (``x_t`` + mean training update), each a variable
    (layer, metric) with metric ``relative_error`` (median ``||pred - true|| / ||x_{t+1} - x_t||``)
    and ``r2`` (``1 - SSE / SST`` of the update, pooled over dimensions, SST about the held-out
    mean). ``noise_std`` (layer): per-dimension std of the training residual, averaged over
    dimensions: ``sigma_t`` of the drift + noise model; ``update_norm`` (layer): median ``||x_{t+1} - x_t||``.
    ``layer`` is the transition's source ``t``; coord ``to_layer`` is ``t + 1``.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1) (got {train_fraction}).")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0 (got {ridge}).")
    da = _states(states)
    n, n_layer, d = (da.sizes[k] for k in DIMS)
    if n_layer < 2:
        raise ValueError("states need at least 2 layers for a transition.")
    n_train = int(round(train_fraction * n))
    if n_train < 2 or n - n_train < 2:
        raise ValueError(f"{n} trajectories split at train_fraction={train_fraction} leave {n_train} to fit and "
                         f"{n - n_train} to test (need >= 2 each): use more trajectories or another fraction.")
    if rank is not None and not 1 <= rank <= min(n_train, d):
        raise ValueError(f"rank must be in 1..min(n_train, d_model) = {min(n_train, d)} (got {rank}).")
    order = np.random.default_rng(seed).permutation(n)
    train, test = order[:n_train], order[n_train:]
    models = ("linear_drift", "no_update", "mean_update")
    scores = {m: np.zeros((n_layer - 1, 2)) for m in models}
    noise, update_norm = np.zeros(n_layer - 1), np.zeros(n_layer - 1)
    nxt = _layer(da, 0)
    for t in range(n_layer - 1):
        x, nxt = nxt, _layer(da, t + 1)
        u = nxt - x
        mu = x[train].mean(0)
        basis = np.linalg.svd(x[train] - mu, full_matrices=False)[2][:rank].T if rank else np.eye(d)
        z_train, z_test = (x[train] - mu) @ basis, (x[test] - mu) @ basis
        u_mean = u[train].mean(0)
        w = _ridge(z_train, u[train] - u_mean, ridge)
        noise[t] = (u[train] - u_mean - z_train @ w).std(0, ddof=1).mean()
        true = u[test]
        true_norm = np.maximum(np.linalg.norm(true, axis=1), np.finfo(float).tiny)
        sst = ((true - true.mean(0)) ** 2).sum()
        update_norm[t] = np.median(np.linalg.norm(u, axis=1))
        for m, pred in (("linear_drift", z_test @ w + u_mean), ("no_update", np.zeros_like(true)),
                        ("mean_update", np.broadcast_to(u_mean, true.shape))):
            err = pred - true
            scores[m][t] = (np.median(np.linalg.norm(err, axis=1) / true_norm),
                            1 - (err ** 2).sum() / sst if sst > 0 else np.nan)
    layers = _layer_coord(da)
    return xr.Dataset(
        {**{m: (("layer", "metric"), scores[m]) for m in models},
         "noise_std": ("layer", noise), "update_norm": ("layer", update_norm)},
        coords={"layer": layers[:-1], "to_layer": ("layer", layers[1:]), "metric": ["relative_error", "r2"]},
        attrs={"analysis": "fit_linear_drift", "model": "x[t+1] = x[t] + A_t x[t] + b_t + noise_std_t * eps",
               "n_train": n_train, "n_test": n - n_train, "ridge": ridge, "rank": rank or d, "seed": seed},
    )


def bundle_view(states, n_components: int = 3) -> xr.DataArray:
    """(trajectory, layer, axis): every state projected on the top principal directions of all states together
    (all layers pooled and centred), a common frame in which the bundle of trajectories can be drawn."""
    da = _states(states)
    x = np.asarray(da.values, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    centred = flat - flat.mean(0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:n_components]
    view = (centred @ basis.T).reshape(x.shape[0], x.shape[1], n_components)
    return xr.DataArray(view, dims=("trajectory", "layer", "axis"), coords={"layer": da["layer"].values}
                        if "layer" in da.coords else None, name="view")
