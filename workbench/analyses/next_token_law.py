"""The law of next-token prediction across layers, and linear future-token probes.

He & Su, "A Law of Next-Token Prediction in Large Language Models" (2024): every layer
contributes equally to next-token prediction, ``PR_l = PR_1 * rho^(l - 1)``.

Definition used (the authors' public code, which ``shared/papers.md`` follows; the paper's
text defines the same prediction residual with the next token as target of a linear
regression on the layer's features):

- features ``X_l``: block ``l``'s output for every token, normalised by a freshly
  initialised norm of the model's own type (unit weight); the last block's output carries
  the trained final norm; the embedding layer is left out (see
  :mod:`workbench.probes.streaming`);
- target ``y``: the id of the next token (the ``token_id`` target);
- ordinary least squares with intercept; ``PR_l = MSE(y, y_hat) / Var(y)`` = RSS / TSS.

Variants: ``shuffled_id`` (ids passed through a fixed random permutation of the
vocabulary: a control, the ordering of ids carries no meaning) and ``one_hot`` (a one-hot
target over the ``one_hot_classes`` most frequent next tokens; PR = total RSS / total TSS
over classes, the multi-output form). Each is reported in-sample (``split="train"``) and on
held-out windows (``split="test"``) with the weights fitted on the training windows.

Everything streams: statistics are accumulated batch by batch in float64
(:class:`~workbench.analyses.linear_readout.ReadoutStats`), so memory is
O(layers x d_model^2) whatever the number of tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..models import ModelHandle
from ..probes.streaming import FeatureBatch, stream_layer_features, token_windows
from .linear_readout import ReadoutStats, check_enough_tokens

LAW_TARGETS = ("token_id", "shuffled_id", "one_hot")


def split_windows(windows: list, heldout: float, seed: int) -> tuple[list, list]:
    """Shuffle windows with ``seed`` and hold out a fraction of them (whole windows, no leakage)."""
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}.")
    order = np.random.default_rng(seed).permutation(len(windows))
    n_test = int(round(heldout * len(windows)))
    if heldout > 0 and n_test == 0 and len(windows) > 1:
        n_test = 1
    if n_test >= len(windows):
        n_test = 0
    test = [windows[i] for i in sorted(order[:n_test])]
    train = [windows[i] for i in sorted(order[n_test:])]
    return train, test


def _frequent_tokens(windows: list, n_classes: int) -> np.ndarray:
    """The ``n_classes`` most frequent target tokens of the training windows (every token but the first)."""
    counts: dict[int, int] = {}
    for w in windows:
        for t in w[1:]:
            counts[t] = counts.get(t, 0) + 1
    return np.array(sorted(counts, key=lambda t: (-counts[t], t))[:n_classes], dtype=np.int64)


def _class_index(vocab_size: int, classes: np.ndarray) -> torch.Tensor:
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[torch.from_numpy(classes)] = torch.arange(len(classes))
    return index


def prediction_residuals(
    model: ModelHandle,
    texts: list[str],
    *,
    targets=("token_id", "shuffled_id"),
    one_hot_classes: int = 512,
    heldout: float = 0.2,
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    ridge: float = 0.0,
    seed: int = 0,
    backend: str = "torch",
    progress: bool = True,
) -> xr.Dataset:
    """PR_l of every layer for each target, in-sample and held out (He & Su; definition in the module doc).

    Texts are cut into windows of ``window`` tokens (at most ``max_tokens`` in all); a fraction ``heldout`` of the windows
    (seeded) is held out. ``ridge`` = 0: ordinary least squares (min-norm if singular);
    ``ridge`` > 0: ridge relative to the mean feature variance (the choice is recorded).
    Returns ``pr`` (layer, target, split) with ``layer`` = block index 0..L-1, plus
    ``n_tokens`` (split) and the solver in ``attrs``.
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LAW_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(LAW_TARGETS)}.")
    windows = token_windows(model, texts, window, max_tokens=max_tokens)
    train, test = split_windows(windows, heldout, seed)
    scalar = [t for t in targets if t != "one_hot"]
    permutation = torch.from_numpy(np.random.default_rng(seed).permutation(model.vocab_size))
    classes = _frequent_tokens(train, one_hot_classes) if "one_hot" in targets else np.zeros(0, np.int64)
    class_of = _class_index(model.vocab_size, classes)
    n_classes = len(classes)

    def make():
        return [ReadoutStats(model.d_model, len(scalar), n_classes) for _ in range(model.n_layers)]

    stats = {"train": make(), "test": make()}

    def adder(split):
        def add(batch: FeatureBatch) -> None:
            nxt = batch.targets[:, 0]
            keep = nxt >= 0  # the last token of a window has no next token
            nxt = nxt[keep]
            columns = {"token_id": nxt, "shuffled_id": permutation[nxt]}
            y = torch.stack([columns[t] for t in scalar], -1) if scalar else None
            labels = class_of[nxt] if n_classes else None
            stats[split][batch.layer].add(batch.features[keep.to(batch.features.device)], y, labels)

        return add

    n_train = stream_layer_features(model, train, adder("train"), batch_size=batch_size, backend=backend,
                                    progress=progress, desc="PR (train)")
    n_test = 0
    if test:
        n_test = stream_layer_features(model, test, adder("test"), batch_size=batch_size, backend=backend,
                                       progress=progress, desc="PR (held out)")
    check_enough_tokens(stats["train"][0].n, model.d_model, what="the next-token-law fit")

    pr = np.full((model.n_layers, len(targets), 2), np.nan)
    solvers = set()
    for layer in range(model.n_layers):
        fit = stats["train"][layer].fit(ridge)
        solvers.add(fit.solver)
        for s, split in enumerate(("train", "test")):
            st = stats[split][layer]
            if st.n < 2:
                continue
            rss, tss = st.residual_sum_of_squares(fit), st.total_sum_of_squares()
            for t, target in enumerate(targets):
                if target == "one_hot":
                    pr[layer, t, s] = rss[len(scalar):].sum() / tss[len(scalar):].sum()
                else:
                    j = scalar.index(target)
                    pr[layer, t, s] = rss[j] / tss[j] if tss[j] > 0 else np.nan
    ds = xr.Dataset(
        {
            "pr": (("layer", "target", "split"), pr, {"long_name": "prediction residual MSE/Var(y)"}),
            "n_tokens": (("split",), [stats["train"][0].n, stats["test"][0].n]),
        },
        coords={"layer": np.arange(model.n_layers), "target": list(targets), "split": ["train", "test"]},
        attrs={
            "analysis": "next_token_law.prediction_residuals",
            "paper": "He & Su, A Law of Next-Token Prediction in Large Language Models (2024)",
            "model": model.name,
            "model_file_hash": model.file_hash,
            "features": "block outputs; fresh unit-weight norm of the model's type (last block: trained final norm)",
            "solver": "; ".join(sorted(solvers)),
            "ridge": ridge,
            "window": window or min(512, model.max_context),
            "windows_train": len(train),
            "windows_test": len(test),
            "tokens_streamed": n_train + n_test,
            "one_hot_classes": n_classes,
            "seed": seed,
            "backend": backend,
        },
    )
    return ds


def law_fit(pr: xr.DataArray) -> xr.Dataset:
    """Fit ``log10 PR_l = a + slope * l`` along ``layer`` (l = 1..L): slope, rho, Pearson r, R^2, PR_L/PR_1.

    He & Su: the law holds when log PR is linear in depth, ``PR_l = PR_1 * rho^(l-1)`` with
    ``rho = 10^slope``. Per-layer contribution ``c_l = log10 PR_(l-1) - log10 PR_l`` (l >= 2;
    NaN for the first layer) and its share ``c_l / sum c``: equal learning = equal shares.
    Other dims of ``pr`` (target, split, model, ...) are kept.
    """
    if "layer" not in pr.dims:
        raise ValueError(f"pr must have a 'layer' dim; it has {pr.dims}.")
    if pr.sizes["layer"] < 2:  # with 2 layers the line is exact (|r| = 1): defined, not informative
        raise ValueError(f"a law fit needs at least 2 layers, got {pr.sizes['layer']}.")
    values = pr.transpose(..., "layer")
    logpr = np.log10(values.values.astype(np.float64))
    if not np.isfinite(logpr).all():
        raise ValueError("PR has NaN or non-positive values: fit only splits/targets that were measured.")
    depth = np.arange(1, pr.sizes["layer"] + 1, dtype=np.float64)
    x = depth - depth.mean()
    y = logpr - logpr.mean(-1, keepdims=True)
    slope = (y * x).sum(-1) / (x * x).sum()
    intercept = logpr.mean(-1) - slope * depth.mean()
    r = (y * x).sum(-1) / np.sqrt((x * x).sum() * (y * y).sum(-1))
    contribution = np.concatenate([np.full(logpr.shape[:-1] + (1,), np.nan), -np.diff(logpr, axis=-1)], axis=-1)
    other = values.dims[:-1]
    coords = {k: v for k, v in values.coords.items() if set(v.dims) <= set(values.dims)}
    return xr.Dataset(
        {
            "slope": (other, slope),
            "intercept": (other, intercept),
            "rho": (other, 10.0**slope),
            "pearson_r": (other, r),
            "r_squared": (other, r * r),
            "pr_first": (other, values.values[..., 0]),
            "pr_last": (other, values.values[..., -1]),
            "pr_ratio": (other, values.values[..., -1] / values.values[..., 0]),
            "fitted_pr": (values.dims, 10.0 ** (intercept[..., None] + slope[..., None] * depth)),
            "contribution": (values.dims, contribution),
            "contribution_share": (values.dims, contribution / np.nansum(contribution, -1, keepdims=True)),
        },
        coords=coords,
        attrs={"paper": "He & Su, A Law of Next-Token Prediction in Large Language Models (2024)",
               "fit": "least squares of log10 PR_l on l = 1..L"},
    )


def future_token_probes(
    model: ModelHandle,
    texts: list[str],
    *,
    horizon: int = 4,
    n_classes: int = 512,
    heldout: float = 0.2,
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    ridge: float = 1e-3,
    seed: int = 0,
    backend: str = "torch",
    progress: bool = True,
) -> xr.Dataset:
    """Held-out accuracy of linear probes from layer-l features to the token k steps ahead, k = 1..horizon.

    A probe is a least-squares one-hot classifier (the multi-output linear regression of
    the law's ``one_hot`` target, predicting ``argmax_c x W_c + b_c``) over the
    ``n_classes`` most frequent tokens of the training windows; a held-out token outside
    those classes counts as a miss (``coverage`` says how many are inside). Features as in
    the law; every probe uses the tokens whose ``horizon`` next tokens are all in the window
    (the last ``horizon`` tokens of each window are left out), so all k share one ``X^T X``. Returns ``accuracy`` (layer, k), ``coverage`` (k), ``n_tokens`` (k).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1, got {horizon}.")
    if not heldout > 0:
        raise ValueError("future-token probes are scored on held-out windows: pass heldout > 0.")
    windows = token_windows(model, texts, window, max_tokens=max_tokens)
    train, test = split_windows(windows, heldout, seed)
    if not test:
        raise ValueError(f"only {len(windows)} window(s): pass more text so some can be held out.")
    classes = _frequent_tokens(train, n_classes)
    class_of = _class_index(model.vocab_size, classes)
    # One X^T X per layer serves every k: a token is used when all ``horizon`` targets exist.
    stats = [ReadoutStats(model.d_model, 0, len(classes), label_sets=horizon) for _ in range(model.n_layers)]

    def add_train(batch: FeatureBatch) -> None:
        keep = (batch.targets >= 0).all(-1)
        stats[batch.layer].add(batch.features[keep.to(batch.features.device)], labels=class_of[batch.targets[keep]])

    stream_layer_features(model, train, add_train, horizon=horizon, batch_size=batch_size, backend=backend,
                          progress=progress, desc="future-token probes (train)")
    check_enough_tokens(stats[0].n, model.d_model, what="the future-token probes")
    fits = [stats[layer].fit(ridge) for layer in range(model.n_layers)]
    weights = [torch.from_numpy(f.weight).float() for f in fits]  # (d, horizon * classes)
    biases = [torch.from_numpy(f.bias).float() for f in fits]
    correct = np.zeros((model.n_layers, horizon))
    counted = np.zeros(horizon)
    inside = np.zeros(horizon)

    def add_test(batch: FeatureBatch) -> None:
        keep = (batch.targets >= 0).all(-1)
        x = batch.features.cpu()[keep]
        scores = (x @ weights[batch.layer] + biases[batch.layer]).reshape(len(x), horizon, len(classes))
        label = class_of[batch.targets[keep]]  # (n, horizon)
        correct[batch.layer] += ((scores.argmax(-1) == label) & (label >= 0)).sum(0).numpy()
        if batch.layer == 0:
            counted[:] += len(x)
            inside[:] += (label >= 0).sum(0).numpy()

    stream_layer_features(model, test, add_test, horizon=horizon, batch_size=batch_size, backend=backend,
                          progress=progress, desc="future-token probes (held out)")
    return xr.Dataset(
        {
            "accuracy": (("layer", "k"), correct / counted, {"long_name": "held-out top-1 accuracy"}),
            "coverage": (("k",), inside / counted, {"long_name": "held-out tokens inside the probe's classes"}),
            "n_tokens": (("k",), counted),
        },
        coords={"layer": np.arange(model.n_layers), "k": np.arange(1, horizon + 1)},
        attrs={
            "analysis": "next_token_law.future_token_probes",
            "model": model.name,
            "n_classes": len(classes),
            "tokens_train": stats[0].n,
            "ridge": ridge,
            "solver": fits[0].solver,
            "seed": seed,
            "window": window or min(512, model.max_context),
        },
    )
