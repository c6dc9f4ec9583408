"""Explore what each layer already predicts: layer slider, model, lens and prompt selectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import xarray as xr

from ..plots.export import export_figure
from ..plots.next_token_law import LENS_METRICS, as_decoder, lens_heatmap, lens_top_k_figure
from .base import Explorer, row


class LensExplorer(Explorer):
    """The lens's top-k next tokens at each position of a prompt for the chosen layer, over a layer x position map.

    ``stats``: ``{(model, lens): Dataset or zero-argument callable}`` of
    :func:`~workbench.analyses.lens.lens_statistics` results (``lens`` "logit" or "tuned");
    callables are called the first time that pair is shown and cached.
    ``decoders``: ``{model: tokenizer, callable id -> str, or sequence of strings}`` to show
    token ids as text. :meth:`from_models` builds both from runs, model handles and lenses.
    ``positions_shown`` tokens are drawn at a time, from the "from token" slider.
    """

    def __init__(self, stats: dict[tuple[str, str], xr.Dataset | Callable[[], xr.Dataset]],
                 decoders: dict | None = None, *, positions_shown: int = 16):
        if not stats:
            raise ValueError("LensExplorer needs lens statistics: {(model, 'logit' or 'tuned'): lens_statistics(...)}.")
        self._sources = dict(stats)
        self._stats: dict[tuple[str, str], xr.Dataset] = {}
        decoders = decoders or {}
        self.models = list(dict.fromkeys(model for model, _ in self._sources))
        self.decoders = {model: as_decoder(decoders.get(model)) for model in self.models}
        self.positions_shown = positions_shown
        self.model = widgets.Dropdown(options=self.models, value=self.models[0], description="model")
        self.lens = widgets.Dropdown(description="lens")
        self.sample = widgets.Dropdown(description="prompt")
        self.metric = widgets.Dropdown(options=[(label, key) for key, label in LENS_METRICS.items()],
                                       value="cross_entropy", description="colour")
        self.layer = widgets.IntSlider(min=0, max=1, description="layer")
        self.start = widgets.IntSlider(min=0, max=0, description="from token")
        self.top_k = go.FigureWidget()
        self.overview = go.FigureWidget()
        self._syncing = False
        self._drawn = False
        self._set_lens_options()
        self._set_stats_options()
        self.model.observe(self._model_changed, names="value")
        self.lens.observe(self._lens_changed, names="value")
        self.sample.observe(self._sample_changed, names="value")
        for control in (self.metric, self.layer, self.start):
            control.observe(self.redraw, names="value")
        self.view = widgets.VBox([
            row(self.model, self.lens, self.sample),
            row(self.layer, self.start, self.metric),
            self.top_k,
            self.overview,
            self._export_controls("lens_top_k"),
        ])
        self.redraw()

    @classmethod
    def from_models(cls, runs: dict, models: dict, lenses: dict | None = None, **kwargs) -> LensExplorer:
        """Lazy statistics from ``runs`` and ``models`` (both keyed by model name) and optional tuned ``lenses``."""
        from ..analyses.lens import lens_statistics

        stats = {}
        for name, run in runs.items():
            stats[(name, "logit")] = lambda run=run, model=models[name]: lens_statistics(run, model)
            if lenses and name in lenses:
                stats[(name, "tuned")] = lambda run=run, model=models[name], lens=lenses[name]: lens_statistics(
                    run, model, lens)
        return cls(stats, {name: models[name].tokenizer for name in runs}, **kwargs)

    # ---------------------------------------------------------------- state

    def stats_for(self, model: str, lens: str) -> xr.Dataset:
        """The statistics of one (model, lens) pair, computed on first use."""
        key = (model, lens)
        if key not in self._stats:
            source = self._sources[key]
            self._stats[key] = (source() if callable(source) else source).load()
        return self._stats[key]

    @property
    def current(self) -> xr.Dataset:
        return self.stats_for(self.model.value, self.lens.value)

    def _set_lens_options(self) -> None:
        options = [lens for model, lens in self._sources if model == self.model.value]
        keep = self.lens.value if self.lens.value in options else options[0]
        self._syncing = True
        self.lens.options = options
        self.lens.value = keep
        self._syncing = False

    def _set_stats_options(self) -> None:
        """Prompt, layer and position ranges of the current statistics (keeping choices where they still fit)."""
        stats = self.current
        self._syncing = True
        texts = [str(t) for t in stats["text"].values] if "text" in stats.coords else [""] * stats.sizes["sample"]
        options = [(f"{i}: {t[:50]}", i) for i, t in enumerate(texts)]
        keep = self.sample.value if self.sample.value is not None and self.sample.value < len(options) else 0
        self.sample.options = options
        self.sample.value = keep
        n_layers = stats.sizes["layer"]
        layer = min(self.layer.value, n_layers - 1) if self._drawn else n_layers // 2
        self.layer.max = n_layers - 1
        self.layer.value = layer
        self._set_start_range()
        self._syncing = False

    def _set_start_range(self) -> None:
        n = int(self.current["valid"].isel(sample=self.sample.value).sum())
        self.start.max = max(n - self.positions_shown, 0)
        self.start.value = min(self.start.value, self.start.max)

    def _model_changed(self, _change=None) -> None:
        self._set_lens_options()
        self._set_stats_options()
        self.redraw()

    def _lens_changed(self, _change=None) -> None:
        if not self._syncing:
            self._set_stats_options()
            self.redraw()

    def _sample_changed(self, _change=None) -> None:
        if not self._syncing:
            self._syncing = True
            self._set_start_range()
            self._syncing = False
            self.redraw()

    # ---------------------------------------------------------------- drawing

    def _figures(self) -> tuple[go.Figure, go.Figure]:
        stats, model = self.current, self.model.value
        window = slice(self.start.value, self.start.value + self.positions_shown)
        decode = self.decoders[model]
        top_k = lens_top_k_figure(stats, self.sample.value, self.layer.value, decode=decode, positions=window,
                                  title=f"{model}, {self.lens.value} lens, layer {self.layer.value}: top-k next tokens")
        overview = lens_heatmap(stats, self.sample.value, self.metric.value, decode=decode, positions=window)
        overview.add_hline(y=self.layer.value, line=dict(color="white", width=2))
        return top_k, overview

    def redraw(self, _change=None) -> None:
        if self._syncing:
            return
        self._drawn = True
        for target, source in zip((self.top_k, self.overview), self._figures()):
            with target.batch_update():
                target.data = []
                target.add_traces(source.data)
                target.layout = source.layout
        self.top_k.layout.height = 90 + 26 * self.current.sizes["k"]
        self.overview.layout.height = max(300, 14 * self.current.sizes["layer"] + 140)

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the current top-k view (publication theme, two columns)."""
        return export_figure(go.Figure(self.top_k), path_stem, formats=formats, columns="two",
                             height=90 + 26 * self.current.sizes["k"])
