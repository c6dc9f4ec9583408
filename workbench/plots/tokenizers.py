"""Figures of the tokenizer diagnostics (:mod:`workbench.analyses.tokenizer_fairness`,
:mod:`~workbench.analyses.undertrained_tokens`, :mod:`~workbench.analyses.boundary_artifacts`).
No metric is computed here. Colours: Okabe-Ito (safe for colour-blind readers)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from .theme import OKABE_ITO

LOG_TICKS = [1, 2, 5, 10, 20, 50]
VERDICT_COLORS = {"strongly_verified": "#D55E00", "weakly_verified": "#E69F00",
                  "weakly_rejected": "#56B4E9", "strongly_rejected": "#0072B2", "not verified": "#BBBBBB"}


def _label(table: xr.Dataset, language: str) -> str:
    names = table.attrs.get("language_names") or {}
    return names.get(language, language) if isinstance(names, dict) else language


def premium_heatmap(table: xr.Dataset, title: str | None = None) -> go.Figure:
    """Languages (rows, sorted by the first tokenizer's premium) x tokenizers: the premium, log colour scale."""
    premium = table.premium.transpose("language", "tokenizer")
    order = premium.isel(tokenizer=0).to_series().sort_values().index
    premium = premium.sel(language=order)
    z = np.log2(premium.values)
    text = [[f"{v:.1f}" for v in row] for row in premium.values]
    ticks = [1, 2, 4, 8, 16, 32]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(t) for t in premium.tokenizer.values], y=[_label(table, str(lang)) for lang in premium.language.values],
        text=text, texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=float(max(np.log2(8), np.nanmax(z))),
        colorbar=dict(title=dict(text="premium", side="right"), tickvals=np.log2(ticks), ticktext=[f"{t}x" for t in ticks],
                      thickness=10),
        hovertemplate="%{y}<br>%{x}: %{text}x the English tokens<extra></extra>",
    ))
    fig.update_layout(title=title or f"Tokenization premium vs {table.attrs.get('reference', 'eng')} (UDHR articles)")
    fig.update_yaxes(tickfont_size=7)
    return fig


def premium_bars(table: xr.Dataset, title: str | None = None) -> go.Figure:
    """Horizontal bars of the premium per language, one bar per tokenizer, sorted by the first tokenizer's."""
    order = table.premium.isel(tokenizer=0).to_series().sort_values().index
    fig = go.Figure()
    for i, tok in enumerate(table.tokenizer.values):
        values = table.premium.sel(tokenizer=tok, language=order).values
        fig.add_trace(go.Bar(y=[_label(table, str(lang)) for lang in order], x=values, orientation="h", name=str(tok),
                             marker_color=OKABE_ITO[i % len(OKABE_ITO)],
                             hovertemplate=f"{tok}<br>%{{y}}: %{{x:.2f}}x<extra></extra>"))
    fig.add_vline(x=1, line_dash="dot", line_color="#666")
    fig.update_layout(barmode="group", bargap=0.2, title=title or "Tokens needed for the same text, relative to English",
                      legend=dict(x=0.98, xanchor="right", y=0.02, yanchor="bottom"))
    fig.update_xaxes(type="log", title_text="premium (tokens / English tokens, log scale)", tickvals=LOG_TICKS,
                     ticktext=[f"{t}x" for t in LOG_TICKS])
    fig.update_yaxes(tickfont_size=7)
    return fig


def loss_vs_premium(points: xr.Dataset, title: str | None = None) -> go.Figure:
    """One point per (model, language): premium on x (log), bits per byte on y.

    ``points``: variables ``premium`` and ``bits_per_byte`` with dims (model, language)."""
    fig = go.Figure()
    for i, model in enumerate(points.model.values):
        one = points.sel(model=model)
        fig.add_trace(go.Scatter(
            x=one.premium.values, y=one.bits_per_byte.values, mode="markers", name=str(model),
            marker=dict(color=OKABE_ITO[i % len(OKABE_ITO)], size=5, symbol=["circle", "diamond", "square"][i % 3]),
            text=[str(lang) for lang in one.language.values],
            hovertemplate=f"{model}<br>%{{text}}: premium %{{x:.2f}}x, %{{y:.2f}} bits/byte<extra></extra>"))
    fig.update_layout(title=title or "Does a token premium mean worse modelling?",
                      legend=dict(x=1.02, y=1), showlegend=True)
    fig.update_xaxes(type="log", title_text="premium vs English (log scale)", tickvals=LOG_TICKS,
                     ticktext=[f"{t}x" for t in LOG_TICKS])
    fig.update_yaxes(title_text="loss (bits per UTF-8 byte)")
    return fig


INDICATOR_TITLES = {"cosine": "cosine distance to unused rows' mean", "centred_cosine": "centred cosine distance",
                    "pc_removed": "cosine distance, 1st PC removed", "l2_distance": "L2 distance to unused rows' mean",
                    "embedding_norm": "input embedding norm"}


def indicator_scatter(indicator: xr.DataArray, verdict: dict, title: str | None = None, *, max_points: int = 20000) -> go.Figure:
    """Indicator value against token id, verified candidates coloured by verdict (others grey, subsampled).

    ``verdict``: {token id: verdict} for the verified candidates; ``indicator`` dims ``token`` with a
    ``text`` coordinate (what each token spells) where available."""
    ids = indicator.token.values
    values = indicator.values
    texts = indicator["text"].values if "text" in indicator.coords else ids.astype(str)
    checked = np.array([t in verdict for t in ids])
    rest = np.flatnonzero(~checked & np.isfinite(values))
    if len(rest) > max_points:
        rest = rest[np.linspace(0, len(rest) - 1, max_points).astype(int)]
    fig = go.Figure(go.Scattergl(x=ids[rest], y=values[rest], mode="markers", name="not verified",
                                 marker=dict(color=VERDICT_COLORS["not verified"], size=2), text=texts[rest],
                                 hovertemplate="%{x}: %{text}<br>%{y:.3f}<extra></extra>"))
    for name in ("strongly_rejected", "weakly_rejected", "weakly_verified", "strongly_verified"):
        picked = np.array([t for t in ids[checked] if verdict[t] == name], dtype=np.int64)
        if len(picked):
            fig.add_trace(go.Scattergl(x=picked, y=values[picked], mode="markers", name=name.replace("_", " "),
                                       marker=dict(color=VERDICT_COLORS[name], size=4), text=texts[picked],
                                       hovertemplate="%{x}: %{text}<br>%{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Under-trained token indicator ({indicator.name})", legend=dict(x=1.01, y=1))
    fig.update_xaxes(title_text="token id")
    fig.update_yaxes(title_text=f"{INDICATOR_TITLES.get(indicator.name, indicator.name)}<br>(low: under-trained)")
    return fig


def sum_logprob_bars(sums: xr.Dataset, title: str | None = None) -> go.Figure:
    """Mean log-probability of the correct sum per number of digits, plain vs with thousands separators."""
    fig = go.Figure()
    for i, fmt in enumerate(sums.format.values):
        lp = sums.logprob.sel(format=fmt)
        mean, sem = lp.mean("problem").values, lp.std("problem").values / np.sqrt(lp.sizes["problem"])
        fig.add_trace(go.Bar(x=[str(d) for d in sums.digits.values], y=mean, name=str(fmt).replace("separators", "1,234 (separators)").replace("plain", "1234 (plain)"),
                             marker_color=OKABE_ITO[i], error_y=dict(type="data", array=1.96 * sem, thickness=1, width=2)))
    fig.update_layout(barmode="group", title=title or f"Correct sums, plain vs thousands separators ({sums.attrs.get('model', '')})",
                      legend=dict(x=0.01, y=0.02))
    fig.update_xaxes(title_text="digits per operand")
    fig.update_yaxes(title_text="log P(correct sum), nats")
    return fig


def noncanonical_cosine(result: xr.Dataset, title: str | None = None, top: int = 6) -> go.Figure:
    """Per layer, cosine of each non-canonical spelling's last-token residual with the canonical one's."""
    fig = go.Figure()
    others = [i for i in range(result.sizes["segmentation"]) if not bool(result.canonical[i])][:top]
    for k, i in enumerate(others):
        fig.add_trace(go.Scatter(
            x=result.layer.values, y=result.cosine[i].values, mode="lines+markers", marker_size=3,
            line=dict(color=OKABE_ITO[k % len(OKABE_ITO)], width=1.2),
            name=f"{result.tokens.values[i]} ({float(result.logprob[i] - result.logprob.where(result.canonical).max()):+.1f} nats)"))
    canonical = str(result.tokens.values[int(np.flatnonzero(result.canonical.values)[0])])
    fig.update_layout(title=title or f"Other spellings of {canonical!r} ({result.attrs.get('model', '')})",
                      legend=dict(x=0.45, y=0.05, font_size=7))
    fig.update_xaxes(title_text="layer (residual after the block)")
    fig.update_yaxes(title_text="cosine with canonical", range=[0, 1.02])
    return fig
