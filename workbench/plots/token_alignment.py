"""Figures of token alignment (from :func:`workbench.analyses.token_alignment_evaluation.match_rates`).

"Token Alignment via Character Matching for Subword Completion" (Athiwaratkun et al., 2024):
match rates of greedy completions with and without alignment, per domain. No metric is
computed here.
"""

from __future__ import annotations

import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

# Okabe-Ito vermillion / blue / bluish green / reddish purple: told apart under colour-vision deficiencies (tested)
METHOD_COLORS = {"plain": "#D55E00", "aligned-1": "#0072B2", "aligned-2": "#009E73", "aligned-3": "#CC79A7"}
METRIC_TITLES = {"word_match": "next word", "prefix_match": "first {n} characters"}
SUBSET_TITLES = {"all": "all cuts", "inside_token": "cuts inside a token", "at_boundary": "cuts at a token boundary"}


def match_rate_bars(rates: xr.Dataset, title: str | None = None) -> go.Figure:
    """Grouped bars of exact-match rates: domains on x, one bar per method, 95% Wilson intervals as error bars.

    ``rates``: the output of ``match_rates`` (dims ``metric``, ``domain``, ``decoding``; variables
    ``rate``, ``low``, ``high``, ``n``), or several concatenated along a ``subset`` dim (one row of
    panels per subset). One column of panels per metric.
    """
    for name in ("rate", "low", "high", "n"):
        if name not in rates:
            raise ValueError(f"rates has no {name!r} variable; pass the Dataset returned by match_rates().")
    if "subset" not in rates.dims:
        rates = rates.expand_dims(subset=[rates.attrs.get("subset", "all")])
    subsets = [str(s) for s in rates["subset"].values]
    metrics = [str(m) for m in rates["metric"].values]
    methods = [str(m) for m in rates["decoding"].values]
    domains = [str(d) for d in rates["domain"].values]
    n_chars = rates.attrs.get("match_chars", "n")
    titles = [f"{METRIC_TITLES.get(m, m).format(n=n_chars)}, {SUBSET_TITLES.get(s, s)}"
              for s in subsets for m in metrics]
    fig = make_subplots(rows=len(subsets), cols=len(metrics), subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.06, vertical_spacing=0.16)
    for r, subset in enumerate(subsets):
        one = rates.sel(subset=subset)
        labels = [f"{d} (n={int(one['n'].sel(domain=d))})" for d in domains]
        for c, metric in enumerate(metrics):
            for method in methods:
                cell = one.sel({"metric": metric, "decoding": method})
                rate, low, high = (cell[v].sel(domain=domains).values for v in ("rate", "low", "high"))
                fig.add_trace(
                    go.Bar(
                        x=labels, y=rate, name=method, legendgroup=method, showlegend=(r == 0 and c == 0),
                        marker_color=METHOD_COLORS.get(method),
                        error_y=dict(type="data", symmetric=False, array=high - rate, arrayminus=rate - low,
                                     thickness=1, width=2),
                        hovertemplate=f"{method}<br>%{{x}}<br>{metric} rate %{{y:.2f}}<extra></extra>",
                    ),
                    row=r + 1, col=c + 1,
                )
    fig.update_layout(barmode="group", bargap=0.25,
                      legend=dict(orientation="h", y=-0.12 if len(subsets) == 1 else -0.08),
                      title=title or f"Greedy completions matching the text ({rates.attrs.get('model', '')})")
    fig.update_yaxes(range=[0, 1], title_text="match rate", col=1)
    fig.update_yaxes(range=[0, 1])
    return fig
