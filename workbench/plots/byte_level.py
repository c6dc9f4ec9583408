"""Figures of exact byte-level probabilities and the tokenization bias they remove.

From :mod:`workbench.analyses.byte_bias` results ("Exact Byte-Level Probabilities from
Tokenized Language Models for FIM-Tasks and Model Ensembles" and "Understanding and
Mitigating Tokenization Bias in Language Models", Phan et al., 2024): next-byte bars (naive vs
token-healed vs exact), the bias along a text with its token boundaries, bits per byte of
models and their byte-level ensemble, cover encodings as a table, and ``log P(text)`` against
where the prompt is cut. No metric is computed here.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from ..tokenization.vocab_bytes import printable_byte
from .tokenization_bias import ESTIMATE_COLORS

COLORS = {"exact": ESTIMATE_COLORS["exact"], "naive": ESTIMATE_COLORS["naive"], "token_healing": "#009E73"}
LABELS = {"exact": "exact", "naive": "naive", "token_healing": "token healing"}
MODEL_COLOR, ENSEMBLE_COLOR = "#7a8fa6", "#e08214"
TOKEN_SHADE = "rgba(110, 120, 140, 0.22)"
SPACE = "\u2423"  # ␣
BOTTOM_LEGEND = dict(orientation="h", x=0, xanchor="left", y=-0.28, yanchor="top")  # margins grow to fit it


def _visible(label: str) -> str:
    """A byte label as exported: ␠ (U+2420, no glyph in the fonts kaleido finds here) drawn as ␣ (U+2423)."""
    return label.replace("\u2420", SPACE)


def _readable(text: str) -> str:
    """Whitespace and control characters made visible (space as ␣, newline as \\n, others as 0xNN)."""
    out = []
    for ch in text:
        code = ord(ch)
        out.append(_visible(printable_byte(code)) if code < 0x80 and not 0x21 <= code <= 0x7E else ch)
    return "".join(out)


def _tail(text: str, n: int = 24) -> str:
    return ("…" if len(text) > n else "") + _readable(text[-n:])


def _char_labels(data: bytes) -> list[str]:
    """One label per byte: the character at its first byte (readable whitespace), '·' on continuation bytes."""
    labels, i = [], 0
    while i < len(data):
        width = next((w for w in (1, 2, 3, 4) if _decodes(data[i:i + w])), 1)
        char = data[i:i + width].decode("utf-8", errors="replace")
        labels.append(_readable(char))
        labels.extend("·" * (width - 1))
        i += width
    return labels


def _decodes(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------- next-byte bars


def next_byte_bars(exact, naive: xr.DataArray | None = None, healed: xr.DataArray | None = None, top: int = 12,
                   title: str | None = None) -> go.Figure:
    """Grouped bars of the ``top`` most probable next bytes: exact vs naive vs token-healed.

    ``exact``, ``naive``, ``healed``: (byte,) DataArrays of next-byte probabilities (from
    :class:`~workbench.analyses.byte_level.ByteLevelModel` and its baselines); or pass a
    :func:`~workbench.analyses.byte_bias.compare_next_byte` Dataset (or one ``byte_pos`` of a
    :func:`~workbench.analyses.byte_bias.bias_along_text` result) as ``exact`` alone. The bytes
    shown are the ``top`` with the largest probability under any estimate, in the exact order;
    labels show spaces as ␣, newlines as \\n and other non-printable bytes as 0xNN.
    """
    prefix, model = None, None
    if isinstance(exact, xr.Dataset):
        ds = exact
        prefix, model = ds.attrs.get("prefix"), ds.attrs.get("model")
        if prefix is None and "byte_pos" in ds.coords and ds["byte_pos"].ndim == 0 and "text" in ds.attrs:
            prefix = ds.attrs["text"].encode("utf-8")[: int(ds["byte_pos"])].decode("utf-8", errors="replace")
        exact, naive, healed = (ds["probability"].sel(estimate=e) for e in ("exact", "naive", "token_healing"))
    else:
        prefix, model = exact.attrs.get("prefix"), exact.attrs.get("model")
    series = {"exact": exact, "naive": naive, "token_healing": healed}
    series = {k: v for k, v in series.items() if v is not None}
    stacked = np.vstack([v.values for v in series.values()])
    order = np.argsort(-stacked.max(axis=0), kind="stable")[:top]
    order = order[np.argsort(-exact.values[order], kind="stable")]
    chars = exact["char"].values if "char" in exact.coords else [printable_byte(b) for b in range(256)]
    labels = [_visible(str(chars[b])) for b in order]
    fig = go.Figure()
    for name, dist in series.items():
        values = dist.values[order]
        fig.add_trace(go.Bar(
            x=labels, y=values, name=LABELS[name], marker_color=COLORS[name],
            customdata=order,
            hovertemplate=f"{LABELS[name]}<br>byte %{{customdata}} (%{{x}})<br>P %{{y:.4f}}<extra></extra>",
        ))
    if title is None:
        title = f"Next byte after “{_tail(prefix)}”" if prefix is not None else "Next-byte probabilities"
        title += f" ({model})" if model else ""
    fig.update_layout(title=title, barmode="group", bargap=0.2, bargroupgap=0.05, xaxis_title="next byte",
                      yaxis_title="P(next byte | prefix)", yaxis_range=[0, 1],
                      legend=BOTTOM_LEGEND)
    fig.update_xaxes(type="category")
    return fig


# --------------------------------------------------------------------------- along a text


def bias_along_text_figure(ds, start: int = 0, stop: int | None = None, title: str | None = None) -> go.Figure:
    """TV distance of the naive and token-healed next-byte distributions to the exact one, at each cut of a text.

    ``ds``: a :func:`~workbench.analyses.byte_bias.bias_along_text` result, or ``{name: result}``
    for one row per model. The x axis is the byte after the cut, labelled with the text's
    characters (␣ a space, · the further bytes of a multi-byte character); ``start:stop`` picks
    the bytes shown. Tokens of the canonical encoding are shaded alternately, so a cut at a
    shade edge is a token boundary; filled markers: cuts at a boundary, open markers: cuts
    inside a token.
    """
    results = {ds.attrs.get("model", ""): ds} if isinstance(ds, xr.Dataset) else dict(ds)
    names = list(results)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=False, vertical_spacing=0.14 if len(names) > 1 else 0,
                        subplot_titles=names if len(names) > 1 else None)
    for r, name in enumerate(names, start=1):
        one = results[name].isel(byte_pos=slice(start, stop))
        pos = one["byte_pos"].values
        data = results[name].attrs["text"].encode("utf-8")
        labels = _char_labels(data)[pos[0]:pos[-1] + 1]
        boundary = one["token_boundary"].values
        token = one["token_index"].values
        for t in np.unique(token[token % 2 == 1]):
            inside = pos[token == t]
            fig.add_vrect(x0=inside[0] - 0.5, x1=inside[-1] + 0.5, fillcolor=TOKEN_SHADE, line_width=0, layer="below",
                          row=r, col=1, exclude_empty_subplots=False)
        for baseline, dash in (("naive", "solid"), ("token_healing", "dot")):
            tv = one["total_variation"].sel(baseline=baseline).values
            fig.add_trace(go.Scatter(
                x=pos, y=tv, mode="lines+markers", name=LABELS[baseline],
                legendgroup=baseline, showlegend=r == 1,
                line=dict(color=COLORS[baseline], width=1.2, dash=dash),
                marker=dict(size=4 if baseline == "naive" else 3, color=COLORS[baseline],
                            symbol=np.where(boundary, "circle", "circle-open")),
                customdata=np.stack([labels, np.where(boundary, "token boundary", "inside a token")], axis=-1),
                hovertemplate=(f"{LABELS[baseline]}<br>cut before byte %{{x}} (%{{customdata[0]}}), "
                               "%{customdata[1]}<br>TV %{y:.3f}<extra></extra>"),
            ), row=r, col=1)
        every = max(1, int(np.ceil(len(pos) / 100)))
        fig.update_xaxes(tickvals=pos[::every], ticktext=labels[::every], tickangle=0, tickfont=dict(size=7),
                         range=[pos[0] - 0.6, pos[-1] + 0.6], row=r, col=1)
        fig.update_yaxes(range=[0, 1.02], title_text="TV to exact", row=r, col=1)
    for symbol, label in (("circle", "cut at a token boundary"), ("circle-open", "inside a token")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label,
                                 marker=dict(symbol=symbol, color="#444", size=5)))
    fig.update_xaxes(title_text="next byte (the cut is just before it); shading: tokens of the canonical encoding",
                     title_font_size=8, row=len(names), col=1)
    if title is None:
        title = "TV distance to the exact next byte" + (f" ({names[0]})" if len(names) == 1 else "")
    fig.update_layout(title=title, legend={**BOTTOM_LEGEND, "y": BOTTOM_LEGEND["y"] / len(names)})
    return fig


# --------------------------------------------------------------------------- ensembles


def bits_per_byte_figure(ds: xr.Dataset, title: str | None = None) -> go.Figure:
    """Bars of bits per byte for each model and their byte-level ensemble(s), with calls per byte on hover.

    ``ds``: an :func:`~workbench.analyses.byte_bias.ensemble_bits_per_byte` result. Diamonds:
    the token-level bits per byte of each model's canonical tokenization (members only).
    """
    models = [str(m) for m in ds["model"].values]
    kinds = [str(k) for k in ds["kind"].values]
    members = [str(m) for m in ds["member"].values]

    def label(model: str) -> str:  # two short lines each: the last bar's label must not run off the figure
        weights = "/".join(f"{v:.1f}" for v in ds["weight"].sel(model=model).values)
        if model == "ensemble_tuned":
            return f"tuned<br>{weights}"
        if model == "ensemble":
            return f"equal<br>{weights}"
        return model.replace("-", "-<br>", 1) if "-" in model else model

    labels = [label(m) for m in models]
    values = ds["bits_per_byte"].values
    customdata = np.stack([ds["calls_per_byte"].values,
                           [", ".join(f"{m} {w:.2f}" for m, w in zip(members, row)) for row in ds["weight"].values]],
                          axis=-1)
    fig = go.Figure()
    for name, color, pick in (("exact byte level, one model", MODEL_COLOR, lambda k: k != "ensemble"),
                              ("exact byte level, ensemble", ENSEMBLE_COLOR, lambda k: k == "ensemble")):
        rows = [i for i, k in enumerate(kinds) if pick(k)]
        if rows:  # one trace per colour, so the legend names both
            fig.add_trace(go.Bar(
                x=[labels[i] for i in rows], y=values[rows], marker_color=color, name=name,
                text=[f"{values[i]:.3f}" for i in rows], textposition="inside", insidetextanchor="start",
                textfont=dict(color="white", size=8), customdata=customdata[rows],
                hovertemplate="%{x}<br>%{y:.4f} bits/byte<br>%{customdata[0]:.2f} model calls per byte"
                              "<br>weights: %{customdata[1]}<extra></extra>",
            ))
    token_level = ds["token_level_bits_per_byte"].values
    shown = np.isfinite(token_level)
    if shown.any():
        fig.add_trace(go.Scatter(
            x=[label for label, s in zip(labels, shown) if s], y=token_level[shown], mode="markers",
            name="token level, canonical tokenization", marker=dict(symbol="diamond", size=6, color="#222"),
            hovertemplate="%{x}<br>token level %{y:.4f} bits/byte<extra></extra>",
        ))
    if title is None:
        title = f"Bits per byte on {int(ds.attrs.get('total_bytes', ds['n_bytes'].sum()))} held-out bytes"
    top = float(np.nanmax(np.concatenate([values, token_level[shown]]))) if shown.any() else float(values.max())
    fig.update_layout(title=title, yaxis_title="bits per byte", yaxis_range=[0, top * 1.08], showlegend=True,
                      legend=BOTTOM_LEGEND, barmode="overlay")
    fig.update_xaxes(type="category", tickangle=0, categoryorder="array", categoryarray=labels)
    return fig


def ensemble_intervals_figure(ev: xr.Dataset, title: str | None = None) -> go.Figure:
    """Bits per byte (left) and gain over the better model (right) with confidence intervals, per domain.

    ``ev``: a :func:`workbench.studies.byte_ensemble.evaluate` result, (domain, predictor). One
    colour per domain; whiskers are the bootstrap intervals; a gain whose whisker stays right of
    0 is significant.
    """
    domains = [str(d) for d in ev["domain"].values]
    predictors = [str(p) for p in ev["predictor"].values]
    short = [p.replace("ensemble, ", "ens., ") for p in predictors]
    palette = dict(zip(domains, ["#0072B2", "#D55E00", "#444444"]))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.06, shared_yaxes=True,
                        subplot_titles=("bits per byte", "gain over the better model (%)"))
    for domain in domains:
        e = ev.sel(domain=domain)
        name = f"{domain}, {int(e['test_bytes'])} bytes"
        bpb = e["bits_per_byte"].values
        fig.add_trace(go.Scatter(
            x=bpb, y=short, mode="markers", name=name, legendgroup=domain, orientation="h",
            marker=dict(color=palette[domain], size=7),
            error_x=dict(type="data", symmetric=False, array=e["high"].values - bpb, arrayminus=bpb - e["low"].values),
            hovertemplate="%{y}<br>%{x:.4f} bits/byte<extra>" + domain + "</extra>",
        ), row=1, col=1)
        mixtures = [i for i, p in enumerate(predictors) if p.startswith("ensemble")]
        gain = 100 * e["gain"].values[mixtures]
        fig.add_trace(go.Scatter(
            x=gain, y=[short[i] for i in mixtures], mode="markers", name=name, legendgroup=domain, showlegend=False,
            orientation="h",
            marker=dict(color=palette[domain], size=7),
            error_x=dict(type="data", symmetric=False, array=100 * e["gain_high"].values[mixtures] - gain,
                         arrayminus=gain - 100 * e["gain_low"].values[mixtures]),
            hovertemplate="%{y}<br>%{x:+.2f}% over " + str(e["baseline"].values) + "<extra>" + domain + "</extra>",
        ), row=1, col=2)
    fig.add_vline(x=0, line=dict(color="#888", dash="dot", width=1), row=1, col=2)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=short[::-1], row=1, col=1)
    lows, highs = ev["low"].values, ev["high"].values
    pad = 0.05 * float(np.nanmax(highs) - np.nanmin(lows)) or 0.01
    fig.update_xaxes(range=[float(np.nanmin(lows)) - pad, float(np.nanmax(highs)) + pad], row=1, col=1)
    if title is None:
        title = f"Byte-level ensemble on held-out text ({int(100 * ev.attrs['confidence'])}% bootstrap intervals)"
    # one row per predictor, the domains side by side within it (both panels share the rows)
    # the legend just under the tick labels (the panels have no axis titles, so BOTTOM_LEGEND's offset leaves a gap)
    fig.update_layout(title=title, legend={**BOTTOM_LEGEND, "y": -0.1}, showlegend=True, scattermode="group",
                      scattergap=0.4)
    return fig


# --------------------------------------------------------------------------- covers


def covers_table(covers: xr.Dataset, title: str | None = None, last_tokens: int | None = 5) -> go.Figure:
    """A table of cover encodings (tokens, probability, share of ``P(x)``), most probable first.

    ``covers``: a :func:`~workbench.analyses.byte_bias.cover_encodings` result. Token
    boundaries are shown as ``|``, spaces as ␣; only the ``last_tokens`` tokens of each cover
    are written out (None: all), earlier ones as "…"; a last row counts the covers not shown
    and the share of ``P(x)`` they carry.
    """

    def shown(cover: str) -> str:
        parts = [_readable(t) for t in cover.split("|")]
        if last_tokens is not None and len(parts) > last_tokens:
            parts = [f"…({len(parts) - last_tokens})"] + parts[-last_tokens:]
        return " | ".join(parts)

    tokens = [shown(str(s)) for s in covers["tokens"].values]
    probability = [f"{p:.2e}" for p in covers["probability"].values]
    share = [f"{s:.1%}" if s >= 0.001 else f"{s:.2g}" for s in covers["share"].values]
    rank = [str(i + 1) for i in range(len(tokens))]
    hidden = int(covers.attrs["n_covers"]) - len(tokens)
    if hidden > 0:
        rest = max(0.0, 1.0 - float(covers.attrs["share_shown"]))
        rank.append("")
        tokens.append(f"… {hidden} more cover encodings")
        probability.append("")
        share.append(f"{rest:.1%}" if rest >= 0.001 else f"{rest:.2g}")
    fig = go.Figure(go.Table(
        columnwidth=[0.4, 6, 1.4, 1.4],
        header=dict(values=["#", "cover encoding (tokens)", "P(t)", "P(t) / P(x)"], align=["right", "left"],
                    fill_color="#e8ecf1", font=dict(size=9)),
        cells=dict(values=[rank, tokens, probability, share], align=["right", "left", "right", "right"],
                   fill_color="white", font=dict(size=8), height=18),
    ))
    if title is None:
        prefix = covers.attrs.get("prefix", "")
        title = f"Cover encodings of “{_tail(prefix)}” (ln P(x) = {covers.attrs['prefix_logprob']:.2f})"
    fig.update_layout(title=title, margin=dict(l=4, r=4, t=30, b=4))
    return fig


# --------------------------------------------------------------------------- prompt cuts


def prompt_cut_figure(ds: xr.Dataset, title: str | None = None) -> go.Figure:
    """``log P(text)`` read as prompt + continuation against where the prompt ends: exact (flat) vs naive.

    ``ds``: a :func:`~workbench.analyses.byte_bias.prompt_cut_invariance` result; the x axis is
    the last character of the prompt; filled naive markers: the cut is a token boundary of the
    canonical encoding. The dashed line is the canonical token-level ``log p(encode(text))``.
    """
    cuts = ds["cut"].values
    data = ds.attrs["text"].encode("utf-8")
    labels = _char_labels(data)
    ticks = [labels[k - 1] for k in cuts]
    boundary = ds["token_boundary"].values
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=cuts, y=ds["naive_logprob"].values, mode="lines+markers",
                             name="naive (tokens of prompt + continuation)", line=dict(color=COLORS["naive"], width=1.2),
                             marker=dict(size=5, color=COLORS["naive"],
                                         symbol=np.where(boundary, "circle", "circle-open")),
                             customdata=ds["prompt_end"].values,
                             hovertemplate="prompt ends “%{customdata}”<br>naive %{y:.2f} nats<extra></extra>"))
    fig.add_trace(go.Scatter(x=cuts, y=ds["exact_logprob"].values, mode="lines+markers", name="exact (byte level)",
                             line=dict(color=COLORS["exact"], width=1.5), marker=dict(size=3),
                             customdata=ds["prompt_end"].values,
                             hovertemplate="prompt ends “%{customdata}”<br>exact %{y:.4f} nats<extra></extra>"))
    fig.add_hline(y=ds.attrs["canonical"], line=dict(color="#555", dash="dash", width=1),
                  annotation_text="canonical tokens", annotation_font_size=7, annotation_position="bottom right")
    fig.update_xaxes(tickvals=cuts, ticktext=ticks, tickangle=0, tickfont=dict(size=7),
                     title_text="last character of the prompt")
    if title is None:
        title = f"log P(text) = prompt + continuation, by where the prompt ends ({ds.attrs.get('model', '')})"
    fig.update_layout(title=title, yaxis_title="log P(text) (nats)", legend=BOTTOM_LEGEND)
    return fig
