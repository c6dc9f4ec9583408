"""Figures, the explorer widget and static export, driven headless."""

import json
import struct
import threading
import time
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import pytest

import workbench as wb
from workbench.analyses import residual_norm_peaks, residual_norms
from workbench.gallery import write_residual_norm_gallery
from workbench.plots.export import ExportError, export_figure, figure_folder, unused_stem
from workbench.plots import (
    COLUMN_WIDTH_PX,
    publication_layout,
    residual_norm_by_position,
    residual_norm_heatmap,
    residual_norm_profile,
)
from workbench.widgets import ResidualNormExplorer
from workbench.widgets import base as widgets_base
from workbench.widgets.base import Explorer, Work, show_figure

from .conftest import PROSE


@pytest.fixture(scope="module")
def run(tiny):
    return wb.capture(tiny, PROSE, ["resid_pre"], progress=False)


def test_figures_show_the_analysis_values(run):
    norms = residual_norms(run)
    n = int(run.n_tokens[1])
    heat = residual_norm_heatmap(norms, sample=1, log_color=False)
    np.testing.assert_allclose(heat.data[0].z, norms.isel(sample=1, pos=slice(0, n)).transpose("layer", "pos").values)
    bars = residual_norm_by_position(norms, sample=1, layer=1)
    np.testing.assert_allclose(bars.data[0].y, norms.isel(sample=1, pos=slice(0, n)).sel(layer=1).values)
    profile = residual_norm_profile(residual_norm_peaks(run), sample=1, layer=1)
    np.testing.assert_allclose(profile.data[0].y, norms.isel(sample=1, pos=0).values)


def test_publication_layout_sizes():
    fig = publication_layout(go.Figure(), columns="two")
    assert fig.layout.width == COLUMN_WIDTH_PX["two"] == 504
    with pytest.raises(ValueError, match="one' or 'two"):
        publication_layout(go.Figure(), columns="three")


def test_explorer_redraws_on_slider_and_prompt(run):
    explorer = ResidualNormExplorer(run)
    norms = explorer.norms
    explorer.layer.value = 0
    np.testing.assert_allclose(explorer.bars.data[0].y, norms.isel(sample=0).sel(layer=0).values[: int(run.n_tokens[0])])
    explorer.prompt.value = 2
    n = int(run.n_tokens[2])
    np.testing.assert_allclose(explorer.bars.data[0].y, norms.isel(sample=2).sel(layer=0).values[:n])
    assert "sample 2" in explorer.bars.layout.title.text
    assert explorer.profile.layout.shapes[0].x0 == 0  # the chosen layer is marked
    assert explorer._repr_mimebundle_()  # renders as a widget
    explorer._profile_clicked(None, type("Points", (), {"xs": [1]})(), None)  # what a click on layer 1 sends
    assert explorer.layer.value == 1 and explorer.profile.layout.shapes[0].x0 == 1  # linked: the bars follow
    np.testing.assert_allclose(explorer.bars.data[0].y, norms.isel(sample=2).sel(layer=1).values[:n])


def test_figures_with_gaps_reach_the_page_as_strict_json():
    """The widget channel sends strict JSON: NaN would fail ("Out of range float values are not JSON
    compliant") and the view would not update. show_figure sends gaps as null."""
    z = np.array([[1.0, np.nan], [np.inf, 2.0]])
    target = go.FigureWidget()
    custom = np.empty((2, 2), dtype=object)  # per-cell hover data mixing text and numbers, as lens_heatmap sends
    custom[:] = [[("a", 1.0), ("b", np.nan)], [("c", 0.5), ("d", 2.0)]]
    show_figure(target, go.Figure([go.Heatmap(z=z, customdata=custom),
                                   go.Scatter(x=[0, 1], y=[np.nan, 0.5], text=["a", "b"])]))
    json.dumps([t.to_plotly_json() for t in target.data], allow_nan=False)  # raises on NaN
    assert [list(r) for r in target.data[0].z] == [[1.0, None], [None, 2.0]]
    assert list(target.data[0].customdata[0][1]) == ["b", None]
    assert list(target.data[1].y) == [None, 0.5] and list(target.data[1].text) == ["a", "b"]


class _OneComputation(Explorer):
    """The smallest explorer: its view needs ``compute`` run once in the background."""

    def __init__(self, compute):
        self.compute, self.done, self.drawn = compute, False, 0
        self.view = widgets.VBox([self._start_work()])
        self.lines = []  # every value the busy line took
        self.busy.observe(lambda change: self.lines.append(change["new"]), names="value")
        self.update()

    def pending_work(self):
        if self.done:
            return None
        return Work("computing the thing", lambda: (self.compute(), setattr(self, "done", True)))

    def draw(self):
        self.drawn += 1


def test_busy_line_shows_only_work_that_takes_longer_than_the_threshold(monkeypatch):
    monkeypatch.setattr(widgets_base, "BUSY_AFTER_S", 5.0)
    quick = _OneComputation(lambda: None)
    quick.wait(30)
    assert quick.drawn == 1 and not any("computing" in line for line in quick.lines)  # no flicker

    monkeypatch.setattr(widgets_base, "BUSY_AFTER_S", 0.05)
    release = threading.Event()
    slow = _OneComputation(lambda: release.wait(30))
    deadline = time.monotonic() + 30
    while "computing the thing" not in slow.busy.value and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "computing the thing" in slow.busy.value and "previous state" in slow.busy.value and slow.drawn == 0
    release.set()
    slow.wait(30)
    assert slow.drawn == 1 and slow.busy.value == ""


def test_export_writes_vector_and_raster(run, tmp_path):
    explorer = ResidualNormExplorer(run)
    paths = explorer.export(tmp_path / "view")
    assert [p.suffix for p in paths] == [".svg", ".pdf", ".png"]
    assert paths[0].read_text().lstrip().startswith("<svg")
    assert paths[1].read_bytes()[:4] == b"%PDF"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_button_writes_outside_the_repository_and_never_overwrites(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figs"))
    explorer = ResidualNormExplorer(run)
    assert explorer.export_path.value == str(tmp_path / "figs" / "residual_norms")
    monkeypatch.delenv("WORKBENCH_FIGURES")
    assert figure_folder() == Path.home() / "workbench-figures"  # the default: outside any checkout
    explorer._export_clicked()
    first = (tmp_path / "figs" / "residual_norms.svg").read_bytes()
    explorer.layer.value = explorer.layer.max  # another view, exported to the same box: kept apart, and said so
    explorer._export_clicked()
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert names == {f"residual_norms{k}.{f}" for k in ("", "-2") for f in ("pdf", "png", "svg")}
    assert (tmp_path / "figs" / "residual_norms.svg").read_bytes() == first
    assert "residual_norms-2.svg" in explorer.status.value and "were kept" in explorer.status.value
    assert unused_stem(tmp_path / "figs" / "residual_norms") == tmp_path / "figs" / "residual_norms-3"
    explorer.export_path.value = "/proc/no/such/place/x"
    explorer._export_clicked()
    assert "export failed" in explorer.status.value


def test_export_keeps_the_publication_size(tmp_path):
    """One column = 3.5 in = 252 px wide in SVG; PNG at 4x (write_images ignores the layout size unless told)."""
    svg, png = export_figure(go.Figure(go.Scatter(y=[1, 2])), tmp_path / "f", formats=("svg", "png"), columns="one")
    assert 'width="252" height="189"' in svg.read_text()
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (252 * 4, 189 * 4)


def test_gallery_regenerates_from_a_saved_run(run, tmp_path):
    saved = wb.save_run(run, tmp_path / "r.zarr")
    written = write_residual_norm_gallery(wb.open_run(saved), tmp_path / "gallery", formats=("svg",))
    assert sorted(p.name for p in written) == [
        "residual_norm_by_position.svg", "residual_norm_heatmap.svg", "residual_norm_profile.svg"]
    again = write_residual_norm_gallery(wb.open_run(saved), tmp_path / "again", formats=("svg", "pdf"))
    for path in written:  # the same saved run gives byte-identical figures (reviewable diffs, reproducible papers)
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    third = write_residual_norm_gallery(wb.open_run(saved), tmp_path / "third", formats=("pdf",))
    assert [p.read_bytes() for p in third] == [p.read_bytes() for p in again if p.suffix == ".pdf"]


def test_export_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="svg"):
        export_figure(go.Figure(), tmp_path / "x", formats=("gif",))
    # an export that dies half-way (here: one file written, then an error) leaves the old files whole
    (tmp_path / "x.svg").write_text("old")

    def dies(figs, paths, **kwargs):
        Path(paths[0]).write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr("plotly.io.write_images", dies)
    with pytest.raises(KeyboardInterrupt):
        export_figure(go.Figure(), tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.svg"] and (tmp_path / "x.svg").read_text() == "old"
    monkeypatch.setattr("workbench.plots.export.find_chromium", lambda: None)
    with pytest.raises(ExportError, match="apt-get install chromium"):
        export_figure(go.Figure(), tmp_path / "x")


def test_gallery_index_collects_each_study_table_with_links_fixed(tmp_path):
    from workbench.gallery import write_gallery_index

    (tmp_path / "tokenization_bias").mkdir()
    (tmp_path / "tokenization_bias" / "summary.md").write_text("# Title\n\n| a | b |\n\n![f](error_vs_steps.svg)\n")
    (tmp_path / "next_token_law.md").write_text("# Law\n\n| r | -0.9 |\n\n## Figures\n\n- [law](next_token_law/law.svg)\n")
    index = write_gallery_index(tmp_path).read_text()
    assert "## Next-token laws across layers" in index and "| r | -0.9 |" in index
    assert "### Figures" in index and "(next_token_law/law.svg)" in index
    assert "(tokenization_bias/error_vs_steps.svg)" in index
    assert "Extreme-token" not in index  # sections without a page are left out


def test_every_gallery_figure_has_a_caption_a_claim_and_its_command():
    from workbench.gallery import caption_key, figure_captions
    from workbench.gallery_captions import CAPTIONS

    gallery = Path(__file__).resolve().parent.parent / "gallery"
    figures = [p.relative_to(gallery) for p in gallery.rglob("*.svg") if "screenshots" not in p.parts]
    keys = {caption_key(p) for p in figures}
    assert caption_key("extreme_tokens/gemma3-270m/streaming.svg") == "extreme_tokens/{model}/streaming"
    assert caption_key("geometry/shuffle_smollm2-135m.svg") == "geometry/shuffle_{model}"
    assert not keys - set(CAPTIONS), f"figures without a caption in workbench/gallery_captions.py: {keys - set(CAPTIONS)}"
    assert not set(CAPTIONS) - keys, f"captions of figures that are not in gallery/: {set(CAPTIONS) - keys}"
    lines = figure_captions(gallery)
    assert len([line for line in lines if line.startswith("- [")]) == len(figures)
    assert any("(`workbench byte-level`)" in line and "covers_table" in line for line in lines)
    assert any("(`workbench tokenization-bias`)" in line and "error_vs_steps" in line for line in lines)


def test_a_figure_without_a_caption_yet_does_not_stop_the_gallery_index(tmp_path, monkeypatch):
    """A study's command writes its figure and then the index: a new figure whose caption is not written yet gets a
    line saying so (the test above keeps the committed gallery complete) instead of failing after the study ran."""
    from workbench import gallery_captions
    from workbench.gallery import figure_captions

    monkeypatch.delitem(gallery_captions.CAPTIONS, "tokenization_bias/ensemble_intervals")

    (tmp_path / "tokenization_bias").mkdir()
    (tmp_path / "tokenization_bias" / "ensemble_intervals.svg").write_text("<svg/>")
    (lines,) = [line for line in figure_captions(tmp_path) if line.startswith("- [")]
    assert "(`workbench byte-ensemble`)" in lines and "no caption yet" in lines


def test_export_hides_only_choreographers_torn_message_log(tmp_path, caplog):
    """Chromium's reply split across two pipe reads makes choreographer log a traceback and carry on: the export
    leaves that one record out (its files are checked instead) and lets every other log record through."""
    import logging

    import logistro

    from workbench.plots.export import _skip_torn_messages

    log = logistro.getLogger("choreographer.channels.pipe")  # as choreographer makes it (logging's would lack debug2)
    log.addFilter(_skip_torn_messages)
    try:
        with caplog.at_level(logging.ERROR, logger="choreographer.channels.pipe"):
            log.error("JSONError decoding message. Ignoring")
            log.error("Error in trying to decode JSON off our read.")
    finally:
        log.removeFilter(_skip_torn_messages)
    assert [r.getMessage() for r in caplog.records] == ["Error in trying to decode JSON off our read."]
