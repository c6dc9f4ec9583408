"""Figures of the tokenization-bias experiment (from :mod:`workbench.analyses.tokenization_bias`).

"Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al., 2024):
transition heatmaps (true / naive / exact side by side) and error against training steps.
No metric is computed here.
"""

from __future__ import annotations

import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

# Okabe-Ito blue and vermillion (naive) + bluish green (token healing, plots/byte_level.py): told apart under colour-vision deficiencies
ESTIMATE_COLORS = {"true": "#222222", "naive": "#D55E00", "naive_limit": "#f4a582", "exact": "#0072B2"}
TOKENIZER_DASHES = ("solid", "dash", "dot", "dashdot")
LABELS = {"naive_limit": "naive, perfect model"}


def transition_heatmaps(probability: xr.DataArray, title: str = "P(next character | context)") -> go.Figure:
    """One context x next-character heatmap per estimate (true, naive, exact), and per tokenizer when there is a ``tokenizer`` dim.

    ``probability`` dims: (estimate, context, next_char) or (tokenizer, estimate, context, next_char);
    select one step first. Cells are annotated with their probability; NaN (a naive limit
    that is undefined because the prompt's encoding starts no longer text) is left blank.
    """
    if "step" in probability.dims:
        raise ValueError("select one training step first, e.g. probability.sel(step=probability.step.max()).")
    if "tokenizer" not in probability.dims:
        probability = probability.expand_dims(tokenizer=[""])
    tokenizers = [str(t) for t in probability["tokenizer"].values]
    methods = [str(m) for m in probability["estimate"].values]
    titles = [f"{LABELS.get(m, m)} ({t})" if t and m != "true" else LABELS.get(m, m) for t in tokenizers for m in methods]
    fig = make_subplots(rows=len(tokenizers), cols=len(methods), subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    for r, tokenizer in enumerate(tokenizers):
        for c, method in enumerate(methods):
            one = probability.sel(tokenizer=tokenizer, estimate=method).transpose("context", "next_char")
            fig.add_trace(
                go.Heatmap(
                    z=one.values, x=[str(v) for v in one["next_char"].values], y=[str(v) for v in one["context"].values],
                    zmin=0, zmax=1, colorscale="Viridis", showscale=(r == 0 and c == len(methods) - 1),
                    colorbar=dict(title="P", thickness=8), texttemplate="%{z:.2f}", textfont=dict(size=7),
                    hovertemplate=f"{method} {tokenizer}<br>P(%{{x}} | %{{y}}) = %{{z:.3f}}<extra></extra>",
                ),
                row=r + 1, col=c + 1,
            )
    fig.update_layout(title=title)
    fig.update_xaxes(title_text="next character", row=len(tokenizers))
    fig.update_yaxes(title_text="context", col=1, autorange="reversed")
    fig.update_yaxes(autorange="reversed")
    return fig


def error_vs_steps(errors: xr.Dataset, title: str = "Error against the true transitions") -> go.Figure:
    """Mean and max absolute error against training step: one line per estimate (colour) and tokenizer (dash).

    The naive limit (what naive prompting gives for a perfectly trained model) does not depend
    on the step: a flat line without markers, for the naive curve to approach.

    ``errors`` dims: (tokenizer, step, estimate) with ``mean_abs_error`` and ``max_abs_error``;
    the ``true`` estimate (zero error) is left out.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=["mean |error|", "max |error|"], horizontal_spacing=0.12)
    methods = [str(m) for m in errors["estimate"].values if str(m) != "true"]
    tokenizers = [str(t) for t in errors["tokenizer"].values]
    steps = [int(s) for s in errors["step"].values]
    for col, variable in enumerate(("mean_abs_error", "max_abs_error"), start=1):
        for i, tokenizer in enumerate(tokenizers):
            for method in methods:
                values = errors[variable].sel(tokenizer=tokenizer, estimate=method).values
                fig.add_trace(
                    go.Scatter(
                        x=steps, y=values, mode="lines" if method == "naive_limit" else "lines+markers",
                        name=f"{LABELS.get(method, method)}, {tokenizer}",
                        legendgroup=f"{method}-{tokenizer}", showlegend=col == 1,
                        line=dict(color=ESTIMATE_COLORS.get(method), dash=TOKENIZER_DASHES[i % len(TOKENIZER_DASHES)],
                                  width=1.5),
                        marker=dict(size=4),
                        hovertemplate=f"{method}, {tokenizer}<br>step %{{x}}<br>{variable} %{{y:.3f}}<extra></extra>",
                    ),
                    row=1, col=col,
                )
    fig.update_xaxes(type="log", title_text="training step", tickvals=steps, ticktext=[str(s) for s in steps])
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text="|P_est - P_true|", col=1)
    fig.update_layout(title=title, legend=dict(tracegroupgap=0))  # one group per series: no gaps, every entry fits
    return fig
