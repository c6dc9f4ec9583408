"""Move the cut point through a text byte by byte: naive vs token-healed vs exact next-byte probabilities."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import xarray as xr

from ..analyses.byte_bias import compare_next_byte, cover_encodings
from ..analyses.byte_level import ByteLevelModel
from ..plots.export import export_figure
from ..models import ModelHandle
from ..plots.byte_level import covers_table, next_byte_bars
from .base import Explorer, Work, row, show_figure

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. Le café est fermé."


class ByteLens(Explorer):
    """A text box and a slider that moves the cut point byte by byte; bars of the next byte three ways; the covers.

    For the prefix ``text[:cut]`` (bytes of its UTF-8): the exact next-byte distribution of
    :class:`~workbench.analyses.byte_level.ByteLevelModel` against the naive and token-healing
    baselines (:func:`~workbench.analyses.byte_bias.compare_next_byte`), and the cover encodings
    summed for ``P(text[:cut])`` (:func:`~workbench.analyses.byte_bias.cover_encodings`), for the
    model chosen in the selector.

    ``models``: ``{name: ModelHandle or ByteLevelModel}`` (or one of either). A ByteLevelModel is
    built for a handle the first time its model is shown (``model_kwargs``: ``prune``,
    ``max_hypotheses``, ...) and kept; each (model, prefix) is computed once and cached.
    ``cut``: bytes before the cut (default: the whole text). ``top``: bars shown;
    ``n_covers``: covers listed.
    """

    def __init__(self, models, text: str = DEFAULT_TEXT, cut: int | None = None, *, top: int = 12,
                 n_covers: int = 8, **model_kwargs):
        if isinstance(models, (ModelHandle, ByteLevelModel)):
            models = {models.name: models}
        if not models:
            raise ValueError("ByteLens needs at least one model: ByteLens({'smollm2-135m': wb.load_model()}).")
        for name, model in models.items():
            if not isinstance(model, (ModelHandle, ByteLevelModel)):
                raise TypeError(f"model {name!r} is a {type(model).__name__}; pass a ModelHandle or a ByteLevelModel.")
        self._sources = dict(models)
        self._model_kwargs = model_kwargs
        self._byte_models: dict[str, ByteLevelModel] = {}
        self._results: dict[tuple[str, bytes], tuple[xr.Dataset, xr.Dataset]] = {}
        self.top, self.n_covers = top, n_covers
        self.model = widgets.Dropdown(options=list(self._sources), description="model")
        self.text = widgets.Textarea(value=text, description="text", continuous_update=False,
                                     layout=widgets.Layout(width="90%", height="4em"))
        n = len(text.encode("utf-8"))
        self.cut = widgets.IntSlider(value=n if cut is None else cut, min=0, max=n, description="cut (bytes)",
                                     continuous_update=False, layout=widgets.Layout(width="90%"))
        self.where = widgets.HTML()
        self.distances = widgets.HTML()
        self.bars = go.FigureWidget()
        self.covers = go.FigureWidget()
        self.model.observe(self.update, names="value")
        self.cut.observe(self.update, names="value")
        self.text.observe(self._text_changed, names="value")
        self.view = widgets.VBox([
            row(self.model),
            self.text,
            self.cut,
            self.where,
            self._start_work(),
            self.bars,
            self.distances,
            self.covers,
            self._export_controls("byte_lens"),
        ])
        self.update()

    # ---------------------------------------------------------------- state

    @property
    def data(self) -> bytes:
        return self.text.value.encode("utf-8")

    @property
    def prefix(self) -> bytes:
        return self.data[: self.cut.value]

    def byte_model(self, name: str) -> ByteLevelModel:
        """The exact byte-level model of ``name``, built on first use."""
        source = self._sources[name]
        with source.lock if isinstance(source, ModelHandle) else source.handle.lock:  # built once, by one thread
            if name not in self._byte_models:
                self._byte_models[name] = (source if isinstance(source, ByteLevelModel)
                                           else ByteLevelModel(source, **self._model_kwargs))
        return self._byte_models[name]

    def results_for(self, name: str, prefix: bytes) -> tuple[xr.Dataset, xr.Dataset]:
        """``(compare_next_byte, cover_encodings)`` for one model and prefix, computed once."""
        key = (name, bytes(prefix))
        if key not in self._results:
            model = self.byte_model(name)
            self._results[key] = (compare_next_byte(model, prefix), cover_encodings(model, prefix, top=self.n_covers))
        return self._results[key]

    def pending_work(self) -> Work | None:
        name, prefix = self.model.value, self.prefix
        if (name, prefix) in self._results:
            return None
        return Work(f"computing the exact next-byte distribution of {name} after byte {len(prefix)}",
                    lambda: self.results_for(name, prefix))

    @property
    def current(self) -> tuple[xr.Dataset, xr.Dataset]:
        return self.results_for(self.model.value, self.prefix)

    def _text_changed(self, _change=None) -> None:
        n = len(self.data)
        with self.cut.hold_trait_notifications():
            self.cut.max = n
            self.cut.value = min(self.cut.value, n)
        self.update()

    # ---------------------------------------------------------------- drawing

    def _describe_cut(self) -> str:
        data, cut = self.data, self.cut.value
        before = data[max(0, cut - 40):cut].decode("utf-8", errors="replace")
        after = data[cut:cut + 20].decode("utf-8", errors="replace")
        inside_char = cut < len(data) and (data[cut] & 0xC0) == 0x80
        note = " (inside a multi-byte UTF-8 character)" if inside_char else ""
        return (f"<code>{html.escape(before)}<b style='color:#D55E00'>|</b>{html.escape(after)}</code>"
                f"&nbsp; byte {cut} of {len(data)}{note}")

    def _figures(self) -> tuple[go.Figure, go.Figure]:
        comparison, covers = self.current
        return next_byte_bars(comparison, top=self.top), covers_table(covers)

    def draw(self) -> None:
        self.where.value = self._describe_cut()
        comparison, _ = self.current
        for target, source in zip((self.bars, self.covers), self._figures()):
            show_figure(target, source)
        self.bars.layout.height = 320
        table = self.covers.data[0]  # the table is sized for a printed page: screen-sized type here
        table.header.font.size, table.cells.font.size, table.cells.height = 13, 13, 24
        self.covers.layout.height = 70 + 26 * (self.n_covers + 2)
        tv = comparison["total_variation"]
        kl = comparison["kl_divergence"]
        self.distances.value = " &nbsp; ".join(
            f"TV({name}, exact) = {float(tv.sel(baseline=b)):.3f}, "
            f"KL(exact ‖ {name}) = {float(kl.sel(baseline=b)):.3f} nats"
            for b, name in (("naive", "naive"), ("token_healing", "token healing")))

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the current bars (``path_stem``) and covers table (``path_stem_covers``), publication theme."""
        self.wait()
        stem = Path(path_stem)
        bars, covers = self._figures()
        written = export_figure(bars, stem, formats=formats, columns="two", height=240)
        written += export_figure(covers, stem.with_name(stem.name + "_covers"), formats=formats, columns="two",
                                 height=80 + 20 * (self.current[1].sizes["cover"] + 2))
        return written
