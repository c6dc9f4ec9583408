"""Slide over depth: a prompt's token geometry (ID, overlap, cosine) and the bundle of last-token trajectories."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from ..plots.export import export_figure
from ..plots.geometry import geometry_curves
from ..plots.theme import OKABE_ITO
from .base import Explorer, row, show_figure

MEDIAN = "median"


class GeometryExplorer(Explorer):
    """A depth slider, a prompt selector and a shuffle-level selector over saved results.

    Left: ID (GRIDE scale 2), neighbourhood overlap (k = 1) and mean cosine by depth for the chosen
    prompt (or the median over prompts) at the chosen shuffle level, with the structured prompt in
    grey for reference and the chosen depth marked. Below: the 3-D view of the last-token
    trajectories (top 3 principal directions of all states), the states at the chosen depth marked.
    Everything is precomputed; a redraw only restyles figures.

    ``geometry``: :func:`~workbench.analyses.token_geometry.token_geometry` of structured prompts;
    ``shuffle``: the same with a ``level`` dim (optional); ``trajectories``: a dataset with ``view``
    (trajectory, layer, axis) as saved by ``workbench geometry`` (optional). From a saved study:
    ``GeometryExplorer.from_study("runs/geometry/smollm2-135m")``.
    """

    def __init__(self, geometry: xr.Dataset, shuffle: xr.Dataset | None = None, trajectories: xr.Dataset | None = None,
                 *, max_lines: int = 80):
        if "id" not in geometry or "depth" not in geometry.dims:
            raise ValueError("GeometryExplorer needs a token_geometry result (variables id, overlap, cosine_mean by depth).")
        self.geometry, self.shuffle, self.trajectories = geometry, shuffle, trajectories
        self.max_lines = max_lines
        depths = [int(d) for d in geometry.depth.values]
        self.depth = widgets.SelectionSlider(options=depths, value=depths[len(depths) // 3], description="depth",
                                             continuous_update=True, layout=widgets.Layout(width="min(520px, 100%)"))
        samples = [int(v) for v in geometry.sample.values]
        texts = geometry["text"].values if "text" in geometry.coords else [f"prompt {i}" for i in samples]
        options = [("median over prompts", MEDIAN)] + [(f"{i}: {str(t)[:48]!r}", i) for i, t in zip(samples, texts)]
        self.prompt = widgets.Dropdown(options=options, value=MEDIAN, description="prompt",
                                       layout=widgets.Layout(width="min(420px, 100%)"))
        levels = [int(v) for v in shuffle.level.values] if shuffle is not None else [0]
        self.level = widgets.Dropdown(options=[(f"{4 ** v if v else 1} blocks" + (" (original)" if v == 0 else ""), v)
                                               for v in levels], value=levels[0], description="shuffle",
                                      disabled=shuffle is None, layout=widgets.Layout(width="min(260px, 100%)"))
        self.caption = widgets.HTML()
        self.curves = go.FigureWidget(layout=dict(height=300, autosize=True))
        self.bundle = go.FigureWidget(layout=dict(height=420, autosize=True)) if trajectories is not None else None
        for control in (self.prompt, self.level, self.depth):
            control.observe(self.update, names="value")
        controls = row(self.depth, self.prompt, self.level)
        parts = [controls, self._start_work(), self.caption, self.curves] + ([self.bundle] if self.bundle is not None else [])
        self.view = widgets.VBox(parts + [self._export_controls("token_geometry")],
                                 layout=widgets.Layout(width="100%", max_width="1100px"))
        self._drawn_selection = None
        self.update()

    @classmethod
    def from_study(cls, folder: str | Path) -> "GeometryExplorer":
        from ..studies.geometry import load_study

        s = load_study(folder)
        return cls(s["geometry"], s["shuffle"], s["trajectories"])

    # ---------------------------------------------------------------- data

    def _shuffled(self) -> bool:
        """Shuffled captures exist for the selection: the median over the shuffled prompts, or one of them."""
        return self.shuffle is not None and (self.prompt.value == MEDIAN or self.prompt.value in self.shuffle.sample.values)

    def selection(self) -> xr.Dataset:
        """The geometry drawn: the chosen level's (with the original for reference), one prompt or the median.

        With shuffles, "median over prompts" is over the shuffled prompts (the study shuffles the first few),
        so the original and the shuffled curves are medians over the same prompts."""
        level, prompt = self.level.value, self.prompt.value
        data = self.shuffle.sel(level=sorted({0, level})) if self._shuffled() else self.geometry.expand_dims(level=[0])
        return data if prompt == MEDIAN else data.sel(sample=prompt)

    # ---------------------------------------------------------------- drawing

    def figure(self) -> go.Figure:
        data = self.selection()
        who = "median over prompts" if self.prompt.value == MEDIAN else f"prompt {self.prompt.value}"
        fig = geometry_curves(data, highlight_depth=self.depth.value,
                              title=f"Token geometry by depth ({who}; {self.geometry.attrs.get('model', '')})")
        if data.sizes.get("level", 1) > 1:
            fig.data[0].line.color = fig.data[1].line.color = fig.data[2].line.color = "#999999"
        fig.update_layout(height=300, margin=dict(l=50, r=10, t=60, b=80), template="simple_white")
        return fig

    def bundle_figure(self) -> go.Figure:
        view = self.trajectories["view"]
        n = min(self.max_lines, view.sizes["trajectory"])
        v = view.isel(trajectory=slice(0, n)).values  # (trajectory, layer, 3)
        fig = go.Figure()
        xs, ys, zs = (np.concatenate([np.r_[v[i, :, a], np.nan] for i in range(n)]) for a in range(3))
        fig.add_trace(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", line=dict(color="#bbbbbb", width=1),
                                   name="trajectories", hoverinfo="skip"))
        at = v[:, min(self.depth.value, v.shape[1] - 1)]
        fig.add_trace(go.Scatter3d(x=at[:, 0], y=at[:, 1], z=at[:, 2], mode="markers", name=f"depth {self.depth.value}",
                                   marker=dict(size=3, color=OKABE_ITO[5])))
        fig.update_layout(title=f"Last-token trajectories ({n} of {view.sizes['trajectory']}), top 3 principal directions",
                          height=420, margin=dict(l=0, r=0, t=40, b=0), template="simple_white",
                          legend=dict(x=0, y=1), scene=dict(xaxis_title="PC 1", yaxis_title="PC 2", zaxis_title="PC 3"))
        return fig

    def _caption(self) -> str:
        data = self.selection().sel(level=self.level.value if self._shuffled() else 0, depth=self.depth.value)
        ids = data.id.sel(scale=2)
        over = f" (median of {ids.sizes['sample']} prompts)" if "sample" in ids.dims else ""
        removed = int(data.n_duplicates.sum())
        return (f"depth {self.depth.value}: ID (TwoNN) <b>{float(ids.median()):.1f}</b>{over}; "
                f"{removed} duplicate token vector{'s' if removed != 1 else ''} removed")

    def _move_depth(self) -> None:
        """Only the depth marker and the caption move: no figure is rebuilt."""
        with self.curves.batch_update():
            for shape in self.curves.layout.shapes:
                shape.x0 = shape.x1 = self.depth.value
        if self.bundle is not None:
            view = self.trajectories["view"]
            at = view.isel(trajectory=slice(0, self.max_lines), layer=min(self.depth.value, view.sizes["layer"] - 1)).values
            with self.bundle.batch_update():
                marker = self.bundle.data[1]
                marker.x, marker.y, marker.z = at[:, 0], at[:, 1], at[:, 2]
                marker.name = f"depth {self.depth.value}"
        self.caption.value = self._caption()

    def draw(self) -> None:
        """Rebuild the curves when the prompt or level changed; otherwise move the depth marker only."""
        selection = (self.prompt.value, self.level.value)
        if selection != self._drawn_selection:
            self.level.disabled = not self._shuffled()  # shuffled captures exist only for the first prompts
            show_figure(self.curves, self.figure())
            if self.bundle is not None and not self.bundle.data:
                show_figure(self.bundle, self.bundle_figure())
            self._drawn_selection = selection
        self._move_depth()

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the curves as shown (and the trajectory view, as ``<stem>_trajectories``), publication theme."""
        path_stem = Path(path_stem)
        written = export_figure(self.figure(), path_stem, formats=formats, columns="two", height=240)
        if self.bundle is not None:
            written += export_figure(self.bundle_figure(), path_stem.with_name(path_stem.name + "_trajectories"),
                                     formats=formats, columns="one", height=260)
        return written
