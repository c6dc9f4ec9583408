"""Explore what each layer already predicts: layer slider, model, lens and prompt selectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import xarray as xr

from ..plots.export import export_figure
from ..plots.next_token_law import LENS_METRICS, as_decoder, lens_heatmap, lens_top_k_figure
from .base import Explorer, Work, layer_slider, prompt_options, row, show_figure


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
        self.sample = widgets.Dropdown(description="prompt", layout=widgets.Layout(width="min(460px, 100%)"))
        self.metric = widgets.Dropdown(options=[(label, key) for key, label in LENS_METRICS.items()],
                                       value="cross_entropy", description="colour")
        self.layer = layer_slider(2)
        self.start = widgets.IntSlider(min=0, max=0, description="from token", layout=widgets.Layout(width="min(420px, 100%)"))
        self.top_k = go.FigureWidget()
        self.overview = go.FigureWidget()
        self._shown: tuple[str, str] | None = None  # the (model, lens) whose ranges the controls have
        self._overview_shows: tuple | None = None  # what the layer x position map was drawn for
        self._set_lens_options()
        self.model.observe(self._model_changed, names="value")
        for control in (self.lens, self.sample, self.metric, self.layer, self.start):
            control.observe(self.update, names="value")
        self.view = widgets.VBox([
            row(self.model, self.lens, self.sample),
            row(self.layer, self.start, self.metric),
            self._start_work(),
            self.top_k,
            self.overview,
            self._export_controls("lens_top_k"),
        ])
        self.update()

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

    def pending_work(self) -> Work | None:
        model, lens = self.model.value, self.lens.value
        if (model, lens) in self._stats or not callable(self._sources[(model, lens)]):
            return None  # at hand
        return Work(f"computing the {lens} lens statistics of {model}", lambda: self.stats_for(model, lens))

    def _set_lens_options(self) -> None:
        options = [lens for model, lens in self._sources if model == self.model.value]
        keep = self.lens.value if self.lens.value in options else options[0]
        self.lens.options = options
        self.lens.value = keep

    def _model_changed(self, _change=None) -> None:
        with self._lock:  # one update once both model and lens are set
            self._drawing, drawing = True, self._drawing
            try:
                self._set_lens_options()
            finally:
                self._drawing = drawing
        self.update()

    def _fit_controls(self) -> None:
        """Prompt, layer and position ranges of the statistics shown (keeping choices where they still fit)."""
        stats = self.current
        if self._shown != (self.model.value, self.lens.value):
            texts = stats["text"].values if "text" in stats.coords else [""] * stats.sizes["sample"]
            options = prompt_options(texts, width=50)
            keep = self.sample.value if self.sample.value is not None and self.sample.value < len(options) else 0
            self.sample.options = options
            self.sample.value = keep
            n_layers = stats.sizes["layer"]
            layer = min(self.layer.value, n_layers - 1) if self._shown else n_layers // 2
            self.layer.max = n_layers - 1
            self.layer.value = layer
            self._shown = (self.model.value, self.lens.value)
        n = int(stats["valid"].isel(sample=self.sample.value).sum())
        self.start.max = max(n - self.positions_shown, 0)
        self.start.value = min(self.start.value, self.start.max)

    # ---------------------------------------------------------------- drawing

    def _window(self) -> slice:
        return slice(self.start.value, self.start.value + self.positions_shown)

    def _top_k_figure(self) -> go.Figure:
        model, lens, layer = self.model.value, self.lens.value, self.layer.value
        return lens_top_k_figure(self.current, self.sample.value, layer, decode=self.decoders[model],
                                 positions=self._window(), title=f"{model}, {lens} lens, layer {layer}: top-k next tokens")

    def draw(self) -> None:
        """The top-k table always; the layer x position map only when what it shows changed (a layer move only
        moves its marker), so a slider step sends one small figure to the page."""
        self._fit_controls()
        show_figure(self.top_k, self._top_k_figure())
        self.top_k.layout.height = 170 + 34 * self.current.sizes["k"]  # room for the rows above the slanted token labels
        shown = (self.model.value, self.lens.value, self.sample.value, self.metric.value, self.start.value)
        if shown != self._overview_shows:
            overview = lens_heatmap(self.current, self.sample.value, self.metric.value, decode=self.decoders[shown[0]],
                                    positions=self._window())
            overview.add_hline(y=self.layer.value, line=dict(color="white", width=2))
            show_figure(self.overview, overview)
            self.overview.layout.height = max(300, 14 * self.current.sizes["layer"] + 140)
            self.overview.data[0].on_click(self._overview_clicked)
            self._overview_shows = shown
        with self.overview.batch_update():
            self.overview.layout.shapes[0].y0 = self.overview.layout.shapes[0].y1 = self.layer.value

    def _overview_clicked(self, trace, points, state) -> None:
        """Linked views: a click on the layer x position map picks that layer for the top-k table."""
        if points.ys:
            self.layer.value = int(points.ys[0])

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the current top-k view (publication theme, two columns)."""
        self.wait()
        return export_figure(go.Figure(self.top_k), path_stem, formats=formats, columns="two",
                             height=90 + 26 * self.current.sizes["k"])
