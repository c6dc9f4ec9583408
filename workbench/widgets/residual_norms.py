"""Explore residual norms: a prompt selector and a layer slider redraw two linked figures."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import xarray as xr

from ..analyses import residual_norm_peaks
from ..plots.export import export_figure
from ..plots import residual_norm_by_position, residual_norm_profile
from .base import Explorer, layer_slider, prompt_dropdown, row


class ResidualNormExplorer(Explorer):
    """Residual norm per token at the chosen layer, and across layers for the chosen prompt.

    ``explorer = ResidualNormExplorer(run); explorer`` in a notebook shows it;
    ``explorer.layer.value = 12`` or ``explorer.prompt.value = 3`` drive it from code;
    ``explorer.export("figures/resid")`` writes the current view (SVG, PDF, PNG).
    """

    def __init__(self, run: xr.Dataset, variable: str = "resid_pre"):
        self.peaks = residual_norm_peaks(run, variable).load()
        self.norms = self.peaks["norm"]
        n_layers = self.norms.sizes["layer"]
        texts = [str(t) for t in run["text"].values]
        self.prompt = prompt_dropdown(texts)
        self.layer = layer_slider(n_layers)
        self.bars = go.FigureWidget(self._bars_figure())
        self.profile = go.FigureWidget(self._profile_figure())
        self.prompt.observe(self.update, names="value")
        self.layer.observe(self.update, names="value")
        for trace in self.profile.data:
            trace.on_click(self._profile_clicked)
        self.view = widgets.VBox(
            [
                row(self.prompt, self.layer),
                self._start_work(),
                row(self.bars, self.profile),
                self._export_controls("residual_norms"),
            ]
        )

    def _bars_figure(self) -> go.Figure:
        return residual_norm_by_position(self.norms, self.prompt.value, self.layer.value)

    def _profile_figure(self) -> go.Figure:
        return residual_norm_profile(self.peaks, self.prompt.value, self.layer.value)

    def _profile_clicked(self, trace, points, state) -> None:
        """Linked views: a click on the profile picks that layer for the bars."""
        if points.xs:
            self.layer.value = int(points.xs[0])

    def draw(self) -> None:
        for target, source in ((self.bars, self._bars_figure()), (self.profile, self._profile_figure())):
            with target.batch_update():
                for trace, new in zip(target.data, source.data):
                    trace.update(new)
                target.layout.title = source.layout.title
                target.layout.shapes = source.layout.shapes

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the current bar view to ``path_stem`` in each format (publication theme)."""
        self.wait()
        return export_figure(go.Figure(self.bars), path_stem, formats=formats)
