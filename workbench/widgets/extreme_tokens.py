"""Explore attention sinks: layer slider, head grid, domain and prompt selectors, sink toggle."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from ..analyses.extreme_tokens import domain_sink_scores, received_by_key
from ..plots.export import export_figure
from .base import SELECTED, Explorer, Work, layer_slider, prompt_dropdown, prompt_options, row


class ExtremeTokenExplorer(Explorer):
    """Head grid of sink scores at the chosen layer; click a head to see its attention pattern.

    ``run`` needs ``attn_received``; attention patterns come from the run's ``attn_pattern`` when
    captured, else from ``pattern_source(sample)`` -> a (layer, head, pos, key_pos) array of one
    prompt (e.g. a one-prompt capture), called in the background the first time a prompt is shown
    and kept, so the layer slider and the head grid then redraw at once. A ``domain`` coordinate on
    ``sample`` enables the domain selector. The toggle "exclude sink" leaves key 0 out of the
    mean-attention bars. Linked views: the chosen head is outlined in the grid; clicking a bar or a
    column of the pattern (or :meth:`select_key`) outlines that key in both.
    """

    def __init__(self, run: xr.Dataset, pattern_source=None):
        if "attn_pattern" not in run and pattern_source is None:
            raise ValueError("the explorer needs attention patterns: capture the 'attn_pattern' probe "
                             "or pass pattern_source=lambda sample: <(layer, head, pos, key) array of that prompt>")
        self.run = run
        self.sink = domain_sink_scores(run).load()
        self._pattern_source = pattern_source
        self._patterns: dict[int, np.ndarray] = {}
        self.key: int | None = None
        domains = ["all"] + (sorted(set(map(str, run["domain"].values))) if "domain" in run.coords else [])
        self.domain = widgets.Dropdown(options=domains, value="all", description="domain")
        self.prompt = prompt_dropdown(run["text"].values, width=50)
        self.layer = layer_slider(run.sizes["layer"])
        self.head = widgets.BoundedIntText(value=0, min=0, max=run.sizes["head"] - 1, description="head",
                                           layout=widgets.Layout(width="12em"))
        self.exclude_sink = widgets.Checkbox(value=False, description="exclude sink (key 0) from averages")
        self._set_prompt_options()
        self.grid = go.FigureWidget(go.Heatmap(zmin=0, zmax=1, colorscale="Magma", showscale=False))
        self.grid.update_layout(height=140, title="sink score per head (click one)", xaxis_title="head",
                                yaxis=dict(showticklabels=False), margin=dict(t=30, b=30, l=10, r=10))
        self.pattern = go.FigureWidget(go.Heatmap(colorscale="Blues", zmin=0))
        self.pattern.update_layout(height=380, xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed")
        self.bars = go.FigureWidget(go.Bar(marker_color="#3b6ea8"))
        self.bars.update_layout(height=380, xaxis_title="key position", yaxis_title="mean attention received")
        self.grid.data[0].on_click(self._grid_clicked)
        self.bars.data[0].on_click(self._key_clicked)
        self.pattern.data[0].on_click(self._key_clicked)
        self.domain.observe(self._domain_changed, names="value")
        for control in (self.prompt, self.layer, self.head, self.exclude_sink):
            control.observe(self.update, names="value")
        self.view = widgets.VBox([
            row(self.domain, self.prompt),
            row(self.layer, self.head, self.exclude_sink),
            self._start_work(),
            self.grid,
            row(self.pattern, self.bars),
            self._export_controls("attention_pattern"),
        ])
        self.update()

    # ---------------------------------------------------------------- state

    def _samples(self) -> list[int]:
        if self.domain.value == "all":
            return list(range(self.run.sizes["sample"]))
        return [i for i, d in enumerate(self.run["domain"].values) if str(d) == self.domain.value]

    def _set_prompt_options(self) -> None:
        texts = self.run["text"].values
        samples = self._samples()
        self.prompt.options = prompt_options(texts, samples, width=50)
        if self.prompt.value not in samples:
            self.prompt.value = samples[0]

    def _domain_changed(self, _change=None) -> None:
        self._set_prompt_options()
        self.update()

    def select_head(self, head: int) -> None:
        self.head.value = int(head)

    def select_key(self, key: int | None) -> None:
        """Outline one key position in the pattern and the bars (None: no outline)."""
        self.key = None if key is None else int(key)
        self.update()

    def _grid_clicked(self, trace, points, state) -> None:
        if points.xs:
            self.select_head(points.xs[0])

    def _key_clicked(self, trace, points, state) -> None:
        if points.xs:
            x = points.xs[0]
            self.select_key(x if isinstance(x, (int, np.integer)) else int(str(x).split(":", 1)[0]))

    def _pattern_at_hand(self, sample: int) -> bool:
        return "attn_pattern" in self.run or sample in self._patterns

    def pending_work(self) -> Work | None:
        sample = self.prompt.value
        if sample is None or self._pattern_at_hand(sample):
            return None
        return Work(f"capturing the attention patterns of prompt {sample}", lambda: self.patterns_of(sample))

    def patterns_of(self, sample: int) -> np.ndarray:
        """(layer, head, pos, key_pos) attention of one prompt from ``pattern_source``, computed once."""
        if sample not in self._patterns:
            n = int(self.run["n_tokens"].values[sample])
            values = np.asarray(self._pattern_source(sample))
            if values.ndim != 4 or values.shape[0] != self.run.sizes["layer"]:
                raise ValueError(f"pattern_source({sample}) gave shape {values.shape}; expected "
                                 f"(layer={self.run.sizes['layer']}, head, pos, key_pos)")
            self._patterns[sample] = values[:, :, :n, :n]
        return self._patterns[sample]

    def pattern_for(self, sample: int, layer: int) -> np.ndarray:
        """(head, pos, key_pos) attention of one prompt and layer, trimmed to its tokens."""
        if "attn_pattern" in self.run:
            n = int(self.run["n_tokens"].values[sample])
            return self.run["attn_pattern"].isel(sample=sample).sel(layer=layer).values[:, :n, :n]
        return self.patterns_of(sample)[list(self.run["layer"].values).index(layer)]

    # ---------------------------------------------------------------- drawing

    def draw(self) -> None:
        sample, layer, head = self.prompt.value, self.layer.value, self.head.value
        if sample is None:
            return
        grid = self.sink.sel(domain=self.domain.value, layer=layer).values[None, :]
        n = int(self.run["n_tokens"].values[sample])
        key = self.key if self.key is not None and self.key < n else None
        tokens = [f"{p}:{str(t)!r}" for p, t in enumerate(self.run["token"].values[sample][:n])]
        pattern = self.pattern_for(sample, layer)[head]
        received = received_by_key(self.run, sample, layer).values[:n]
        keys = np.arange(n)
        if self.exclude_sink.value:
            received, keys, bar_tokens = received[1:], keys[1:], tokens[1:]
        else:
            bar_tokens = tokens
        outline = dict(type="rect", line=dict(color=SELECTED, width=2), fillcolor="rgba(0,0,0,0)")
        with self.grid.batch_update():
            self.grid.data[0].z = grid
            self.grid.data[0].x = list(range(grid.shape[1]))
            self.grid.layout.title.text = f"sink score per head, layer {layer} ({self.domain.value}); click a head"
            self.grid.layout.shapes = [dict(outline, x0=head - 0.5, x1=head + 0.5, y0=-0.5, y1=0.5)]
        with self.pattern.batch_update():
            self.pattern.data[0].z = pattern
            self.pattern.data[0].x = tokens
            self.pattern.data[0].y = tokens
            self.pattern.layout.title.text = f"layer {layer} head {head}, prompt {sample}"
            self.pattern.layout.shapes = ([] if key is None else
                                          [dict(outline, x0=key - 0.5, x1=key + 0.5, y0=-0.5, y1=n - 0.5)])
        with self.bars.batch_update():
            self.bars.data[0].x = keys
            self.bars.data[0].y = received
            self.bars.data[0].hovertext = bar_tokens
            self.bars.data[0].marker.color = [SELECTED if k == key else "#3b6ea8" for k in keys]
            suffix = " (sink excluded)" if self.exclude_sink.value else ""
            picked = f"; key {key} outlined" if key is not None else ""
            self.bars.layout.title.text = f"mean over heads, layer {layer}{suffix}{picked}"

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the current attention pattern view (publication theme)."""
        self.wait()
        return export_figure(go.Figure(self.pattern), path_stem, formats=formats, columns="one", height=252)
