"""Figures of residual-stream norms (from :mod:`workbench.analyses.residual_norms`)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

# Norms span decades (the first token's ~100x peak): a log axis labelled at powers of ten, all in one format.
LOG_DECADES = dict(yaxis_type="log", yaxis_dtick=1, yaxis_tickformat=",d")


def _token_labels(norms: xr.DataArray, sample: int) -> list[str]:
    one = norms.isel(sample=sample)
    n = int(one["valid"].sum())
    return [f"{p}:{str(t)!r}"[:24] for p, t in zip(range(n), one["token"].values[:n])]


def residual_norm_heatmap(norms: xr.DataArray, sample: int = 0, *, log_color: bool = True) -> go.Figure:
    """Layer x position heatmap of residual norms for one sample (hover shows the token)."""
    one = norms.isel(sample=sample)
    n = int(one["valid"].sum())
    z = one.isel(pos=slice(0, n)).transpose("layer", "pos").values
    labels = _token_labels(norms, sample)
    fig = go.Figure(
        go.Heatmap(
            z=np.log10(z) if log_color else z,
            x=list(range(n)),
            y=one["layer"].values,
            customdata=np.broadcast_to(np.array(labels, dtype=object), z.shape),
            text=np.round(z, 1),
            hovertemplate="layer %{y}<br>token %{customdata}<br>norm %{text}<extra></extra>",
            colorscale="Viridis",
            colorbar=dict(title="log10 norm" if log_color else "norm", thickness=8),
        )
    )
    fig.update_layout(title=f"Residual norm, sample {sample}", xaxis_title="position", yaxis_title="layer")
    return fig


def residual_norm_profile(peaks: xr.Dataset, sample: int = 0, layer: int | None = None) -> go.Figure:
    """Residual norm across layers of the first token vs the median token; optionally mark ``layer``.

    ``peaks``: :func:`workbench.analyses.residual_norms.residual_norm_peaks` (``norm``, ``median_norm``).
    """
    one = peaks["norm"].isel(sample=sample)
    layers = one["layer"].values
    first = one.isel(pos=0).values
    median = peaks["median_norm"].isel(sample=sample).values
    fig = go.Figure(
        [
            go.Scatter(x=layers, y=first, mode="lines+markers", name=f"first token {str(one['token'].values[0])!r}"),
            go.Scatter(x=layers, y=median, mode="lines+markers", name="median token"),
        ]
    )
    if layer is not None:
        fig.add_vline(x=layer, line_dash="dot", line_color="#888")
    fig.update_layout(
        title="Residual norm by layer", xaxis_title="layer", yaxis_title="residual norm ‖h‖₂", **LOG_DECADES,
        legend=dict(x=0.98, y=0.02, xanchor="right", yanchor="bottom"),  # below the median line: no data there
    )
    return fig


def residual_norm_by_position(norms: xr.DataArray, sample: int = 0, layer: int = 0) -> go.Figure:
    """Bars of each token's residual norm at one layer, on a log axis: the residual peak (often 100x the
    others) stands out without flattening the rest."""
    one = norms.isel(sample=sample).sel(layer=layer)
    n = int(one["valid"].sum())
    fig = go.Figure(
        go.Bar(
            x=list(range(n)),
            y=one.values[:n],
            customdata=_token_labels(norms, sample),
            hovertemplate="token %{customdata}<br>norm %{y:.1f}<extra></extra>",
            marker_color="#3b6ea8",
        )
    )
    fig.update_layout(
        title=f"Residual norm at layer {layer}, sample {sample}", xaxis_title="position", yaxis_title="residual norm ‖h‖₂",
        **LOG_DECADES,
    )
    return fig
