"""Figures of the next-token law, the logit/tuned lens and future-token probes.

From :mod:`workbench.analyses.next_token_law` and :mod:`workbench.analyses.lens`; only
selection and formatting happen here (token ids are decoded for labels).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

LENS_METRICS = {
    "cross_entropy": "cross-entropy (nats)",
    "kl_to_final": "KL to final (nats)",
    "entropy": "entropy (nats)",
    "final_top1_rank": "rank of final top-1",
}
LENS_COLORS = {"logit": "#7a8fa6", "tuned": "#d1495b"}
MODEL_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")  # Okabe-Ito: apart under colour-vision deficiencies


class TokenDecoder:
    """Token ids -> display strings, each id decoded once.

    ``source``: a tokenizer (``batch_decode``, as the run's ``token`` coordinate is built), a
    callable ``id -> str``, a sequence of strings indexed by id, or None (ids shown as ``#id``).
    """

    def __init__(self, source=None):
        self.source = source
        self.cache: dict[int, str] = {}

    def _decode_new(self, ids: list[int]) -> list[str]:
        if self.source is None or not ids:
            return [f"#{i}" for i in ids]
        if hasattr(self.source, "batch_decode"):
            return list(self.source.batch_decode([[i] for i in ids]))
        if callable(self.source):
            return [str(self.source(i)) for i in ids]
        return [str(self.source[i]) for i in ids]

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        new = [int(i) for i in np.unique(ids) if int(i) not in self.cache and i >= 0]
        self.cache.update(zip(new, self._decode_new(new)))
        self.cache.setdefault(-1, "")
        return np.vectorize(self.cache.__getitem__, otypes=[object])(ids) if ids.size else ids.astype(object)


def as_decoder(decode) -> TokenDecoder:
    return decode if isinstance(decode, TokenDecoder) else TokenDecoder(decode)


def show_token(token: str, limit: int = 14) -> str:
    """A token for a label: quoted so spaces and newlines are visible, long ones cut."""
    text = repr(str(token))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _depth_label(pr: xr.DataArray) -> str:
    picked = [str(pr.coords[name].item()) for name in ("target", "split")
              if name in pr.coords and pr.coords[name].ndim == 0]
    return f" ({', '.join(picked)})" if picked else ""


def law_figure(fits: dict[str, tuple[xr.DataArray, xr.Dataset]], title: str | None = None) -> go.Figure:
    """Log-scale prediction residual PR_l against layer l = 1..L with the fitted law, one panel per model.

    ``fits``: model name -> (``pr`` over ``layer`` only, e.g. ``pr.sel(target="token_id",
    split="test")``, and ``law_fit(pr)``). The fit's Pearson r and rho go in the legend.
    """
    if not fits:
        raise ValueError("law_figure needs at least one model: fits = {name: (pr, law_fit(pr))}.")
    for name, (pr, fit) in fits.items():
        if pr.dims != ("layer",) or fit["fitted_pr"].dims != ("layer",):
            raise ValueError(
                f"{name}: pr and its fit must have only a 'layer' dim (got {pr.dims} and {fit['fitted_pr'].dims}); "
                "select one target and split first, e.g. pr.sel(target='token_id', split='test')."
            )
    names = list(fits)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names if len(names) > 1 else None,
                        horizontal_spacing=0.1)
    for i, name in enumerate(names):
        pr, fit = fits[name]
        depth = np.arange(1, pr.sizes["layer"] + 1)
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        fig.add_trace(
            go.Scatter(x=depth, y=pr.values, mode="markers", name=f"{name} PR", legendgroup=name,
                       marker=dict(color=color, size=5),
                       hovertemplate=f"{name}<br>layer %{{x}}<br>PR %{{y:.4f}}<extra></extra>"),
            row=1, col=i + 1,
        )
        r, rho = float(fit["pearson_r"]), float(fit["rho"])
        fig.add_trace(
            go.Scatter(x=depth, y=fit["fitted_pr"].values, mode="lines", legendgroup=name,
                       name=f"fit: r={r:.3f}, ρ={rho:.3f}", line=dict(color=color, dash="dash", width=1.5),
                       hovertemplate=f"{name} fit<br>layer %{{x}}<br>PR %{{y:.4f}}<extra></extra>"),
            row=1, col=i + 1,
        )
        fig.update_xaxes(title_text="layer l = 1..L", range=[0.5, len(depth) + 0.5], row=1, col=i + 1)
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="PR_l (log scale)", col=1)
    first_pr = next(iter(fits.values()))[0]
    fig.update_layout(title=title or f"Next-token law{_depth_label(first_pr)}",
                      legend=dict(orientation="h", x=0, xanchor="left", y=-0.3, yanchor="top"))
    return fig


def contribution_figure(fit: xr.Dataset, title: str | None = None) -> go.Figure:
    """Each layer's share of the total drop in log PR (layers 2..L), with the equal-share line 1/(L-1)."""
    share = fit["contribution_share"]
    if share.dims != ("layer",):
        raise ValueError(f"the fit must have only a 'layer' dim (got {share.dims}); select one target and split first.")
    depth = np.arange(1, share.sizes["layer"] + 1)
    fig = go.Figure(
        go.Bar(x=depth[1:], y=share.values[1:], marker_color="#3b6ea8", name="share",
               customdata=fit["contribution"].values[1:],
               hovertemplate="layer %{x}<br>share %{y:.3f}<br>log10 PR drop %{customdata:.4f}<extra></extra>")
    )
    equal = 1 / (len(depth) - 1)
    fig.add_hline(y=equal, line=dict(color="#555", dash="dot", width=1))
    fig.add_annotation(text=f"dotted: equal share 1/(L-1) = {equal:.3f}", xref="paper", yref="paper", x=1, y=1,
                       xanchor="right", yanchor="bottom", showarrow=False, font_size=8)
    fig.update_layout(title=title or "Per-layer contribution", showlegend=False,
                      xaxis_title="layer l = 1..L", yaxis_title="share of the log10 PR drop")
    return fig


def _lens_cells(stats: xr.Dataset, sample: int, positions: slice | None) -> tuple[xr.Dataset, np.ndarray]:
    one = stats.isel(sample=sample)
    n = int(one["valid"].sum())
    pos = np.arange(n)[positions if positions is not None else slice(None)]
    if len(pos) == 0:
        raise ValueError(f"no positions selected: sample {sample} has {n} tokens.")
    return one.isel(pos=pos), pos


def _token_ticks(one: xr.Dataset, pos: np.ndarray, max_ticks: int = 48) -> dict:
    """Token tick labels, every n-th one when there are more than ``max_ticks``."""
    every = -(-len(pos) // max_ticks)
    return dict(tickmode="array", tickvals=list(pos[::every]),
                ticktext=[show_token(t) for t in one["token"].values[::every]], tickangle=-60)


def lens_heatmap(
    stats: xr.Dataset,
    sample: int = 0,
    metric: str = "cross_entropy",
    *,
    decode=None,
    positions: slice | None = None,
    show_top1: bool | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x position heatmap of a lens metric for one sample; x ticks are the tokens.

    Hover shows the lens's top-k tokens and probabilities (ids decoded with ``decode``: a
    tokenizer, a callable, a sequence of strings or a :class:`TokenDecoder`); with
    ``show_top1`` (default: when at most 24 positions are drawn) each cell is labelled with
    the lens's most likely next token. ``final_top1_rank`` is coloured on log10(1 + rank).
    ``positions`` picks a range of tokens.
    """
    if metric not in LENS_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(LENS_METRICS)}.")
    decoder = as_decoder(decode)
    one, pos = _lens_cells(stats, sample, positions)
    show_top1 = len(pos) <= 24 if show_top1 is None else show_top1
    values = one[metric].transpose("layer", "pos").values.astype(float)
    words = decoder(one["top_k_ids"].transpose("layer", "pos", "k").values)
    probs = one["top_k_probs"].transpose("layer", "pos", "k").values
    hover = np.empty(values.shape, dtype=object)
    for index in np.ndindex(values.shape):
        hover[index] = "<br>".join(f"{show_token(w, 24)} {p:.3f}" for w, p in zip(words[index], probs[index]))
    tokens = one["token"].values
    current = np.broadcast_to(np.array([show_token(t, 24) for t in tokens], dtype=object), values.shape)
    is_rank = metric == "final_top1_rank"
    z = np.log10(1 + values) if is_rank else values
    fig = go.Figure(
        go.Heatmap(
            z=z, x=pos, y=one["layer"].values, colorscale="Viridis",
            customdata=np.stack([current, hover, values.astype(object)], -1),
            text=np.vectorize(lambda w: show_token(w, 8), otypes=[object])(words[..., 0]) if show_top1 else None,
            texttemplate="%{text}" if show_top1 else None, textfont=dict(size=7),
            colorbar=dict(title="log10(1+rank)" if is_rank else "nats", thickness=8),
            hovertemplate=(f"layer %{{y}}, position %{{x}} %{{customdata[0]}}<br>{LENS_METRICS[metric]} "
                           "%{customdata[2]:.3f}<br><b>lens top-k</b><br>%{customdata[1]}<extra></extra>"),
        )
    )
    lens = stats.attrs.get("lens", "")
    fig.update_layout(title=title or f"{lens.capitalize()} lens: {LENS_METRICS[metric]}, sample {sample}",
                      xaxis=dict(title="input token (lens predicts the next one)", **_token_ticks(one, pos)),
                      yaxis_title="layer")
    return fig


def lens_top_k_figure(
    stats: xr.Dataset, sample: int, layer: int, *, decode=None, positions: slice | None = None,
    title: str | None = None,
) -> go.Figure:
    """One layer as a table: the lens's top-k next tokens (rows) at each position (columns), coloured by probability."""
    decoder = as_decoder(decode)
    one, pos = _lens_cells(stats, sample, positions)
    at = one.sel(layer=layer)
    probs = at["top_k_probs"].transpose("k", "pos").values
    words = decoder(at["top_k_ids"].transpose("k", "pos").values)
    labels = np.vectorize(lambda w: show_token(w, 10), otypes=[object])(words)
    ranks = at["k"].values + 1
    fig = go.Figure(
        go.Heatmap(
            z=probs, x=pos, y=ranks, zmin=0, zmax=1, colorscale="Blues", text=labels, texttemplate="%{text}",
            textfont=dict(size=8), colorbar=dict(title="prob", thickness=8),
            customdata=np.broadcast_to(np.array([show_token(t, 24) for t in one["token"].values], dtype=object),
                                       probs.shape),
            hovertemplate="after %{customdata}<br>top-%{y}: %{text} (%{z:.3f})<extra></extra>",
        )
    )
    lens = stats.attrs.get("lens", "")
    fig.update_layout(
        title=title or f"{lens.capitalize()} lens at layer {layer}, sample {sample}",
        xaxis=dict(title="input token", **_token_ticks(one, pos)),
        yaxis=dict(title="lens rank", autorange="reversed", tickmode="array", tickvals=list(ranks)),
    )
    return fig


def lens_comparison_figure(
    logit_summary: xr.Dataset, tuned_summary: xr.Dataset, title: str | None = None
) -> go.Figure:
    """Per-layer cross-entropy and KL to the final output, logit lens vs tuned lens (from ``lens_summary``)."""
    panels = (("cross_entropy", "cross-entropy (nats)"), ("kl_to_final", "KL(p_final || q_l) (nats)"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=[label for _, label in panels], horizontal_spacing=0.14)
    for name, summary in (("logit", logit_summary), ("tuned", tuned_summary)):
        for col, (variable, label) in enumerate(panels, start=1):
            fig.add_trace(
                go.Scatter(x=summary["layer"].values, y=summary[variable].values, mode="lines+markers",
                           name=f"{name} lens", legendgroup=name, showlegend=col == 1,
                           line=dict(color=LENS_COLORS[name], width=1.5), marker=dict(size=4),
                           hovertemplate=f"{name} lens<br>layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"),
                row=1, col=col,
            )
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="nats", col=1)
    model = logit_summary.attrs.get("model")
    fig.update_layout(title=title or ("Logit vs tuned lens" + (f", {model}" if model else "")))
    return fig


def future_token_figure(probes: xr.Dataset, title: str | None = None) -> go.Figure:
    """Layer x k heatmap of held-out accuracy of linear probes for the token k steps ahead."""
    accuracy = probes["accuracy"].transpose("layer", "k")
    ks = accuracy["k"].values
    coverage = np.broadcast_to(probes["coverage"].sel(k=ks).values, accuracy.shape)
    # cell numbers only where a row is tall enough to hold them (at most 12 layers); the colour bar reads the rest
    labels = dict(text=np.round(accuracy.values, 2), texttemplate="%{text}", textfont=dict(size=7)) \
        if accuracy.shape[0] <= 12 else {}
    fig = go.Figure(
        go.Heatmap(
            z=accuracy.values, x=[f"k={k}" for k in ks], y=accuracy["layer"].values, zmin=0, colorscale="Viridis", **labels,
            customdata=coverage, colorbar=dict(title="accuracy", thickness=8),
            hovertemplate="layer %{y}, token %{x} ahead<br>accuracy %{z:.3f}<br>"
                          "held-out tokens inside the classes %{customdata:.2f}<extra></extra>",
        )
    )
    model = probes.attrs.get("model")
    fig.update_layout(title=title or ("Future-token probes" + (f", {model}" if model else "")),
                      xaxis_title="tokens ahead", yaxis_title="layer")
    return fig

