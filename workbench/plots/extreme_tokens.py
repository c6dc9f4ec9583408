"""Figures of the extreme-token phenomena (from :mod:`workbench.analyses.extreme_tokens`)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .theme import OKABE_ITO


def sink_score_heatmap(sink: xr.DataArray, title: str = "Attention-sink score") -> go.Figure:
    """Layer x head heatmap of sink scores; ``sink`` has dims (layer, head) (average the rest first)."""
    z = sink.transpose("layer", "head").values
    fig = go.Figure(
        go.Heatmap(
            z=z, x=sink["head"].values, y=sink["layer"].values, zmin=0, zmax=1, colorscale="Magma",
            colorbar=dict(title="sink", thickness=8),
            hovertemplate="layer %{y} head %{x}<br>attention on sink %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    return fig


def sink_score_by_domain(sink: xr.DataArray) -> go.Figure:
    """One layer x head heatmap per domain; ``sink`` dims (domain, layer, head)."""
    domains = [str(d) for d in sink["domain"].values]
    fig = make_subplots(rows=1, cols=len(domains), subplot_titles=domains, shared_yaxes=True, horizontal_spacing=0.02)
    for i, domain in enumerate(domains):
        one = sink.sel(domain=domain).transpose("layer", "head")
        fig.add_trace(
            go.Heatmap(z=one.values, x=one["head"].values, y=one["layer"].values, zmin=0, zmax=1, colorscale="Magma",
                       showscale=i == len(domains) - 1, colorbar=dict(title="sink", thickness=8),
                       hovertemplate=f"{domain}<br>layer %{{y}} head %{{x}}<br>sink %{{z:.2f}}<extra></extra>"),
            row=1, col=i + 1,
        )
    fig.update_layout(title="Attention-sink score by input domain")
    fig.update_xaxes(title_text="head")
    fig.update_yaxes(title_text="layer", col=1)
    return fig


def value_norm_vs_attention(received: xr.DataArray, value_norm: xr.DataArray, tokens: xr.DataArray) -> go.Figure:
    """Scatter of each (head, token)'s value norm against the attention it receives, sink highlighted.

    Inputs for one sample and layer: ``received`` (head, key_pos), ``value_norm`` (head, pos),
    ``tokens`` (pos). Value-state drains: the most-attended token has the smallest values.
    """
    n = int(np.isfinite(value_norm.values[0]).sum())
    x = received.values[:, :n]
    y = value_norm.values[:, :n]
    labels = np.broadcast_to(np.array([f"{p}:{str(t)!r}" for p, t in enumerate(tokens.values[:n])]), x.shape)
    is_sink = np.zeros_like(x, dtype=bool)
    is_sink[:, 0] = True
    fig = go.Figure()
    for mask, name, color in ((~is_sink, "other tokens", "#7a8fa6"), (is_sink, "first token", OKABE_ITO[5])):
        fig.add_trace(go.Scatter(x=x[mask], y=y[mask], mode="markers", name=name, text=labels[mask],
                                 marker=dict(color=color, size=5, opacity=0.7), showlegend=False,
                                 hovertemplate="%{text}<br>received %{x:.3f}<br>value norm %{y:.2f}<extra></extra>"))
        # each group named beside its points (no legend box to cover data or squeeze the plot); log axes take log10
        shown = mask & np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        if shown.any():
            top = np.argmax(np.where(shown, y, -np.inf))
            fig.add_annotation(x=np.log10(x.flat[top]), y=np.log10(y.flat[top]), text=name, showarrow=False,
                               font=dict(color=color), yshift=10, xanchor="right" if name == "first token" else "center")
    norms = y[np.isfinite(y) & (y > 0)]
    ticks = _one_two_five(norms.min(), norms.max()) if norms.size else []
    fig.update_layout(title="Value norm vs attention received", xaxis_title="attention received (mean over queries)",
                      yaxis_title="value norm ‖v W_O^h‖",
                      # powers of ten (not "100μ"); norms at 1-2-5 steps, each written out (plotly's own log ticks
                      # label 20 and 50 as a small "2" and "5")
                      xaxis=dict(type="log", dtick=1, exponentformat="power", tickangle=0),
                      yaxis=dict(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks]))
    return fig


def _one_two_five(low: float, high: float) -> list[float]:
    """1, 2, 5, 10, 20, ... from the step at or below ``low`` to the one at or above ``high``."""
    steps = [m * 10.0**e for e in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1) for m in (1, 2, 5)]
    below = max([t for t in steps if t <= low], default=steps[0])
    above = min([t for t in steps if t >= high], default=steps[-1])
    return [t for t in steps if below <= t <= above]


def massive_activation_map(max_abs: xr.DataArray) -> go.Figure:
    """Layer x feature-dimension heatmap of max |activation|, log10 colour (Sun et al.)."""
    z = np.log10(np.maximum(max_abs.transpose("layer", "d_model").values, 1e-3))
    fig = go.Figure(
        go.Heatmap(z=z, y=max_abs["layer"].values, colorscale="Viridis", colorbar=dict(title="log10 |a|", thickness=8),
                   hovertemplate="layer %{y} dim %{x}<br>log10 max |a| %{z:.2f}<extra></extra>")
    )
    fig.update_layout(title="Largest |activation| per dimension", xaxis_title="feature dimension", yaxis_title="layer")
    return fig


def massive_activation_profile(max_abs: xr.DataArray, dims: list[int]) -> go.Figure:
    """Max |a| across layers for the massive dimensions vs the median dimension (log scale)."""
    fig = go.Figure()
    for d in dims:
        fig.add_trace(go.Scatter(x=max_abs["layer"].values, y=max_abs.isel(d_model=d).values, mode="lines+markers",
                                 name=f"dim {d}"))
    fig.add_trace(go.Scatter(x=max_abs["layer"].values, y=max_abs.median("d_model").values, mode="lines",
                             name="median dim", line=dict(dash="dot", color="#888")))
    fig.update_layout(title="Massive activations across layers", xaxis_title="layer", yaxis_title="max |a|",
                      yaxis=dict(type="log", dtick=1, exponentformat="power"))  # every decade, one number format
    return fig


def head_state_map(effects: xr.Dataset, labels: xr.DataArray, mode: str = "zero") -> go.Figure:
    """Per domain: layer x head heatmap of the loss change on ablation, dormant heads marked with a dot."""
    delta = effects["delta_loss"].sel(mode=mode)
    domains = [str(d) for d in delta["domain"].values]
    limit = float(np.nanmax(np.abs(delta.values))) or 1.0
    fig = make_subplots(rows=1, cols=len(domains), subplot_titles=domains, shared_yaxes=True, horizontal_spacing=0.02)
    for i, domain in enumerate(domains):
        one = delta.sel(domain=domain).transpose("layer", "head")
        fig.add_trace(
            go.Heatmap(z=one.values, x=one["head"].values, y=one["layer"].values, zmid=0, zmin=-limit, zmax=limit,
                       colorscale="RdBu_r", showscale=i == len(domains) - 1, colorbar=dict(title="Δ loss", thickness=8),
                       hovertemplate=f"{domain}<br>layer %{{y}} head %{{x}}<br>Δ loss %{{z:.4f}}<extra></extra>"),
            row=1, col=i + 1,
        )
        dormant = labels.sel(domain=domain).transpose("layer", "head").values == "dormant"
        layer_idx, head_idx = np.nonzero(dormant)
        fig.add_trace(
            go.Scatter(x=one["head"].values[head_idx], y=one["layer"].values[layer_idx], mode="markers",
                       marker=dict(color="black", size=4), name="dormant", showlegend=False,  # the title names the dots
                       hoverinfo="skip"),
            row=1, col=i + 1,
        )
    fig.update_layout(title=f"Loss change when a head is ablated ({mode}); dots: dormant heads")
    fig.update_xaxes(title_text="head")
    fig.update_yaxes(title_text="layer", col=1)
    return fig


def scaling_curves(sweep: xr.Dataset) -> go.Figure:
    """Loss and attention entropy against the first-token attention scale, one line per layer group."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("next-token loss", "attention entropy"))
    for i, group in enumerate(sweep["group"].values):
        one = sweep.sel(group=group)
        label = f"{group} ({str(one['layers'].values)})"
        style = dict(mode="lines+markers", name=label, legendgroup=str(group), line_color=OKABE_ITO[i % len(OKABE_ITO)])
        fig.add_trace(go.Scatter(x=one["scale"].values, y=one["loss"].values, **style), row=1, col=1)
        # the same colour in both panels: the one legend entry names both lines
        fig.add_trace(go.Scatter(x=one["scale"].values, y=one["entropy"].values, showlegend=False, **style), row=1, col=2)
    fig.update_xaxes(title_text="scale of attention to the first token")
    fig.update_yaxes(title_text="nats/token", col=1)
    fig.update_yaxes(title_text="nats", col=2)
    fig.update_layout(title="Scaling first-token attention (ZeroTuning)")
    return fig


def condition_bars(result: xr.Dataset, variable: str, title: str, yaxis_title: str) -> go.Figure:
    """Bars of one variable over a ``condition`` dim (StreamingLLM, massive-activation interventions)."""
    values = result[variable].values
    fig = go.Figure(go.Bar(x=[str(c) for c in result["condition"].values], y=values, marker_color=OKABE_ITO[0],
                           text=[f"{v:.3g}" for v in values], textposition="outside", cliponaxis=False))
    fig.update_layout(title=title, yaxis_title=yaxis_title)
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0:  # headroom for the labels above the tallest bar
        fig.update_yaxes(range=[0, 1.15 * finite.max()])
    return fig
