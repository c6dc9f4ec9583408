"""Figures of token geometry and layerwise updates (:mod:`workbench.analyses.token_geometry`,
:mod:`~workbench.analyses.trajectories`, :mod:`~workbench.analyses.layer_updates`,
:mod:`~workbench.analyses.layer_stages`, :mod:`~workbench.analyses.residual_redundancy`).
No metric is computed here. Curves of several models share one relative-depth axis: the residual
entering block t sits at t / n_layers (0 = the embeddings, 1 = what leaves the last block), block l
itself at (l + 0.5) / n_layers, between its input and its output. Colours: Okabe-Ito; ordered levels (shuffling) use a sequential scale."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from .theme import OKABE_ITO

DASHES = ["solid", "dash", "dot", "dashdot"]


def _relative(depth, n_layers: int | None = None) -> np.ndarray:
    """Residual states at depth t (entering block t; t = n_layers: leaving the last block) -> t / n_layers."""
    depth = np.asarray(depth, float)
    return depth / (n_layers or max(depth.max(), 1))


def _block(layer, n_layers: int) -> np.ndarray:
    """Block l sits between depths l and l + 1: (l + 0.5) / n_layers on the same axis as the states."""
    return (np.asarray(layer, float) + 0.5) / n_layers


def _band(fig, x, low, high, color, row=None, col=None, name=""):
    """A translucent band between ``low`` and ``high`` (no legend entry)."""
    rgb = tuple(int(color.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4))
    kw = dict(row=row, col=col) if row else {}
    fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[high, low[::-1]], fill="toself", line_width=0,
                             fillcolor=f"rgba{rgb + (0.18,)}", hoverinfo="skip", showlegend=False, name=name), **kw)


def _quartiles(values: xr.DataArray, dim: str = "sample"):
    q = values.quantile([0.25, 0.5, 0.75], dim=dim, skipna=True)
    return q.sel(quantile=0.25).values, q.sel(quantile=0.5).values, q.sel(quantile=0.75).values


def id_profile(geometries: dict[str, xr.Dataset], scale: int = 2, title: str | None = None) -> go.Figure:
    """Median intrinsic dimension over prompts vs relative depth, one line per model, interquartile band."""
    fig = go.Figure()
    for i, (name, g) in enumerate(geometries.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        x = _relative(g.depth.values)
        low, mid, high = _quartiles(g.id.sel(scale=scale))
        _band(fig, x, low, high, color)
        fig.add_trace(go.Scatter(x=x, y=mid, name=name, line=dict(color=color, dash=DASHES[i % 4]),
                                 hovertemplate=f"{name}<br>depth %{{x:.2f}}: ID %{{y:.1f}}<extra></extra>"))
    fig.update_layout(title=title or f"Token-cloud ID by depth (GRIDE n2 = {scale})",
                      legend=dict(x=0.98, xanchor="right", y=0.98))
    fig.update_xaxes(title_text="relative depth (0 = embeddings, 1 = last layer)", range=[0, 1])
    fig.update_yaxes(title_text="intrinsic dimension", rangemode="tozero")
    return fig


def geometry_curves(geometry: xr.Dataset, *, scale: int = 2, k: int = 1, group: str = "level",
                    title: str | None = None, highlight_depth: int | None = None) -> go.Figure:
    """ID, neighbourhood overlap (k) and mean cosine vs depth, one line per entry of ``group`` (median over prompts).

    ``geometry``: a :func:`token_geometry` result, optionally with a ``group`` dim (shuffle level);
    a single prompt (no ``sample`` dim) is drawn as is.
    """
    fig = make_subplots(rows=1, cols=3, subplot_titles=(f"ID (scale {scale})", f"overlap, k = {k}", "mean cosine"),
                        horizontal_spacing=0.09)
    groups = geometry[group].values if group in geometry.dims else [None]
    n = len(groups)
    colors = sample_colorscale("Viridis", [0.85 * i / max(n - 1, 1) for i in range(n)]) if n > 1 else [OKABE_ITO[0]]
    for i, value in enumerate(groups):
        g = geometry.sel({group: value}) if value is not None else geometry
        series = [g.id.sel(scale=scale), g.overlap.sel(k=k), g.cosine_mean]
        if value is None:
            label = "original"
        elif group == "level":
            label = "original" if value == 0 else f"4^{value} blocks shuffled"
        else:
            label = f"{group} {value}"
        for col, s in enumerate(series, start=1):
            y = s.median("sample", skipna=True).values if "sample" in s.dims else s.values
            fig.add_trace(go.Scatter(x=g.depth.values, y=y, name=label, legendgroup=label, showlegend=col == 1,
                                     line=dict(color=colors[i], width=1.5),
                                     hovertemplate=f"{label}<br>depth %{{x}}: %{{y:.3g}}<extra></extra>"), row=1, col=col)
    if highlight_depth is not None:
        for col in (1, 2, 3):
            fig.add_vline(x=highlight_depth, line_dash="dot", line_color="#666", row=1, col=col)
    fig.update_xaxes(title_text="depth")
    fig.update_yaxes(rangemode="tozero", col=1)
    fig.update_yaxes(range=[0, 1.02], col=2)
    fig.update_layout(title=title or "Token geometry by depth (median over prompts)",
                      legend=dict(orientation="h", x=0, y=-0.28, yanchor="top"))
    return fig


def id_loss_figure(geometries: dict[str, xr.Dataset], title: str | None = None) -> go.Figure:
    """Spearman's rho (prompt ID vs prompt mean cross-entropy) per relative depth, bootstrap interval as a band."""
    fig = go.Figure()
    for i, (name, g) in enumerate(geometries.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        x = _relative(g.depth.values)
        _band(fig, x, g.spearman_low.values, g.spearman_high.values, color)
        fig.add_trace(go.Scatter(x=x, y=g.spearman.values, name=name, line=dict(color=color, dash=DASHES[i % 4]),
                                 hovertemplate=f"{name}<br>depth %{{x:.2f}}: rho %{{y:.2f}}<extra></extra>"))
    fig.add_hline(y=0, line_color="#999", line_width=0.8)
    fig.update_layout(title=title or "Prompts with higher loss have higher ID? (Spearman, 95% bootstrap interval)",
                      legend=dict(x=0.98, xanchor="right", y=0.02, yanchor="bottom"))
    fig.update_xaxes(title_text="relative depth", range=[0, 1])
    fig.update_yaxes(title_text="Spearman's rho (ID vs loss)", range=[-1, 1])
    return fig


def update_profile(profiles: dict[str, xr.Dataset], title: str | None = None) -> go.Figure:
    """Residual norm (log) and each layer's relative contribution ||u|| / ||h + u|| vs relative depth; sink tokens dashed."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("median ||h|| entering the layer", "relative contribution ||u|| / ||h + u||"),
                        horizontal_spacing=0.12)
    for i, (name, p) in enumerate(profiles.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        n = len(p.layer)
        for tokens, dash in (("other", "solid"), ("sink", "dot")):
            if tokens not in p.tokens.values or int(p.n_tokens.sel(tokens=tokens)) == 0:
                continue
            one = p.sel(tokens=tokens)
            label = f"{name}, {'sink tokens' if tokens == 'sink' else 'other tokens'}"
            for col, var, x in ((1, "residual_norm", _relative(p.layer.values, n)), (2, "contribution", _block(p.layer.values, n))):
                fig.add_trace(go.Scatter(x=x, y=one[var].values, name=label, legendgroup=label, showlegend=col == 1,
                                         line=dict(color=color, dash=dash),
                                         hovertemplate=f"{label}<br>depth %{{x:.2f}}: %{{y:.3g}}<extra></extra>"),
                              row=1, col=col)
    fig.update_yaxes(type="log", col=1, title_text="norm (log scale)")
    fig.update_yaxes(col=2, rangemode="tozero")
    fig.update_xaxes(title_text="relative depth", range=[0, 1])
    fig.update_layout(title=title or "Residual norms grow with depth; each layer's share shrinks (PreNorm dilution)",
                      legend=dict(orientation="h", x=0, y=-0.28, yanchor="top"))
    return fig


def tokenwise_figure(fits: dict[str, xr.Dataset], effects: dict[str, xr.Dataset], n_layers: dict[str, int],
                     title: str | None = None) -> go.Figure:
    """Held-out R^2 of tokenwise fits per relative depth, and Spearman(leftover size, output change) per layer."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out R^2 of u ~ f(h)", "Spearman(||u - f(h)||, KL)"),
                        horizontal_spacing=0.12)
    # The legend names each model's colour and each fit's dash once (legend-only entries), not every line: it stays
    # one row under the panels at two-column width.
    fit_kinds = list(next(iter(fits.values())).fit.values) if fits else []
    for i, (name, fit) in enumerate(fits.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        x = _block(fit.layer.values, n_layers[name])
        for j, label in enumerate(fit.fit.values):
            fig.add_trace(go.Scatter(x=x, y=fit.r2.sel(fit=label).values, mode="lines", showlegend=False,
                                     name=f"{name}: R^2, {label} fit", line=dict(color=color, dash=DASHES[j % 4]),
                                     hovertemplate=f"{name} {label}<br>depth %{{x:.2f}}: R^2 %{{y:.2f}}<extra></extra>"),
                          row=1, col=1)
        e = effects[name]
        fig.add_trace(go.Scatter(x=_block(e.layer.values, n_layers[name]), y=e.spearman.values, showlegend=False,
                                 name=f"{name}: Spearman, {e.attrs['fit']} fit replacing the update",
                                 mode="lines+markers", marker_size=3, line=dict(color=color),
                                 hovertemplate=f"{name}<br>depth %{{x:.2f}}: rho %{{y:.2f}}<extra></extra>"),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, line=dict(color=color)), row=1, col=1)
    for j, label in enumerate(fit_kinds):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{label} fit",
                                 line=dict(color="#555", dash=DASHES[j % 4])), row=1, col=1)
    fig.update_xaxes(title_text="relative depth", range=[0, 1])
    fig.update_yaxes(range=[-0.05, 1.02], col=1)
    fig.update_yaxes(range=[-1, 1], col=2)
    fig.update_layout(title=title or "Layer updates are mostly a function of each token's own state",
                      legend=dict(orientation="h", x=0, y=-0.28, yanchor="top"))
    return fig


def stages_figure(sweeps: dict[str, xr.Dataset], title: str | None = None) -> go.Figure:
    """Top-1 retention and KL(original || intervened) vs relative depth, layers deleted (solid) and swapped (dashed),
    and the logit lens's KL to the final output and entropy per layer."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09,
                        subplot_titles=("top-1 kept", "KL(original || intervened)", "logit lens (nats)"))
    for i, (name, s) in enumerate(sweeps.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        for kind, dash in (("delete", "solid"), ("swap", "dash")):
            one = s.where(s.kind == kind, drop=True)
            label = f"{name}: {'delete layer' if kind == 'delete' else 'swap with next'}"
            for col, var in ((1, "top1_retention"), (2, "kl")):
                fig.add_trace(go.Scatter(x=one.relative_depth.values, y=one[var].values, name=label, legendgroup=label,
                                         showlegend=col == 1, line=dict(color=color, dash=dash),
                                         hovertemplate=f"{label}<br>%{{text}}: %{{y:.3g}}<extra></extra>",
                                         text=[str(v) for v in one.intervention.values]), row=1, col=col)
        n = len(s.layer_index)
        for var, dash, what in (("lens_kl_to_final", "dot", "KL to final"), ("lens_entropy", "dashdot", "entropy")):
            y = np.maximum(s[var].values, 1e-3)  # KL = 0 at the last layer (the lens is the output): drawn at 1e-3
            fig.add_trace(go.Scatter(x=_relative(s.layer_index.values + 1, n), y=y, name=f"{name}: logit lens {what}",
                                     line=dict(color=color, dash=dash)), row=1, col=3)
    fig.update_xaxes(title_text="relative depth", range=[0, 1])
    fig.update_yaxes(range=[0, 1.02], col=1)
    fig.update_yaxes(type="log", col=2, title_text="nats (log)")
    fig.update_yaxes(type="log", col=3)
    fig.update_layout(title=title or "Stages of inference: one layer deleted or two swapped",
                      legend=dict(orientation="h", x=0, y=-0.28, yanchor="top"))
    return fig


def redundancy_figure(redundancy: dict[str, xr.Dataset], memory: dict[str, dict], title: str | None = None) -> go.Figure:
    """KL after patching the whole residual vs only the last position, per relative depth; bytes per token cached."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=("patch prompt A's residual into B: KL to A", "cache per token (bf16)"))
    floor = 1e-12  # KL = 0 drawn at the floor of the log axis
    for i, (name, r) in enumerate(redundancy.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        x = _relative(r.layer.values, r.attrs.get("n_layers") or len(r.layer))
        for var, dash, what in (("kl_full", "solid", "whole residual"), ("kl_last_position", "dash", "last position only")):
            fig.add_trace(go.Scatter(x=x, y=np.maximum(r[var].values, floor), name=f"{name}: {what}",
                                     line=dict(color=color, dash=dash), mode="lines+markers", marker_size=3,
                                     hovertemplate=f"{name} {what}<br>depth %{{x:.2f}}: KL %{{y:.2g}}<extra></extra>"),
                          row=1, col=1)
    names = list(memory)
    for j, (key, label) in enumerate((("residual_bytes_per_token", "residual (one layer)"),
                                      ("kv_bytes_per_token", "KV cache (all layers)"))):
        fig.add_trace(go.Bar(x=names, y=[memory[n][key] / 1024 for n in names], name=label, marker_color=OKABE_ITO[j + 4],
                             text=[f"{memory[n][key] / 1024:.0f}" for n in names], textposition="outside",
                             cliponaxis=False), row=1, col=2)
    fig.update_yaxes(type="log", col=1, title_text=f"KL (nats, log; 0 drawn at {floor:g})", exponentformat="power",
                     dtick=3)
    fig.update_xaxes(title_text="relative depth", col=1, range=[0, 1])
    fig.update_yaxes(type="log", col=2, title_text="KiB per token (log)")
    fig.update_layout(title=title or "The residual stream is all you need: KV is recomputable from it",
                      barmode="group", legend=dict(orientation="h", x=0, y=-0.3, yanchor="top"))
    return fig


def trajectories_figure(trajs: dict[str, xr.Dataset], title: str | None = None) -> go.Figure:
    """Lines of thought: components for 90% of the ensemble's variance by depth; KL(full || rank-K) of the output
    vs K; held-out error of the linear drift model vs the no-update and mean-update baselines by depth."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.1,
                        subplot_titles=("components for 90% variance", "KL(full || rank K) of the output",
                                        "next-layer error (held out)"))
    for i, (name, t) in enumerate(trajs.items()):
        color = OKABE_ITO[i % len(OKABE_ITO)]
        fig.add_trace(go.Scatter(x=_relative(t.layer.values), y=t.components_90.values, name=name, showlegend=False,
                                 line=dict(color=color), hovertemplate=f"{name}<br>depth %{{x:.2f}}: %{{y}}<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=t["rank"].values, y=t.kl_mean.values, name=name, showlegend=False,
                                 mode="lines+markers", marker_size=3, line=dict(color=color),
                                 hovertemplate=f"{name}<br>K = %{{x}}: KL %{{y:.3g}}<extra></extra>"), row=1, col=2)
        x = _block(t.transition.values, len(t.layer) - 1)
        for model, dash, label in (("linear_drift", "solid", "linear drift"), ("no_update", "dot", "no update"),
                                   ("mean_update", "dash", "mean update")):
            fig.add_trace(go.Scatter(x=x, y=t[model].sel(metric="relative_error").values, name=f"{name}: {label}",
                                     line=dict(color=color, dash=dash),
                                     hovertemplate=f"{name} {label}<br>depth %{{x:.2f}}: %{{y:.2f}}<extra></extra>"),
                          row=1, col=3)
    fig.update_xaxes(title_text="relative depth", range=[0, 1], col=1)
    fig.update_yaxes(title_text="principal components", rangemode="tozero", col=1)
    fig.update_xaxes(title_text="K (log)", type="log", col=2)
    fig.update_yaxes(type="log", col=2, title_text="nats (log)")
    fig.update_xaxes(title_text="relative depth", range=[0, 1], col=3)
    fig.update_yaxes(title_text="||pred - true|| / ||update||", col=3, rangemode="tozero")
    fig.update_layout(title=title or "Lines of thought: last-token trajectories are low-dimensional and nearly linear",
                      legend=dict(orientation="h", x=0, y=-0.28, yanchor="top"))
    return fig
