"""The publication theme keeps a figure's own legend placement (it styles the legend, it does not replace it);
series colours stay apart for colour-blind readers; every gallery legend shows all of its entries."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import plotly.graph_objects as go
import pytest

from workbench.plots.theme import publication_layout


def test_theme_keeps_legend_placement():
    fig = go.Figure(go.Scatter(x=[1], y=[1], name="a"))
    fig.update_layout(legend=dict(x=0.1, y=0.2, orientation="h"))
    publication_layout(fig)
    assert (fig.layout.legend.x, fig.layout.legend.y, fig.layout.legend.orientation) == (0.1, 0.2, "h")
    assert fig.layout.legend.font.size == 8


def test_series_colours_stay_apart_under_colour_vision_deficiencies():
    """Every palette that tells series apart (the theme's Okabe-Ito colorway and each figure module's own) keeps every
    pair at least 10 CAM02-UCS units apart under simulated full deuteranopia, protanopia and tritanopia
    (colorspacious, Machado et al. 2009). The red / green pair these figures used before fails it."""
    import itertools

    import numpy as np
    from colorspacious import cspace_convert

    from workbench.plots.byte_level import COLORS, ENSEMBLE_COLOR, MODEL_COLOR
    from workbench.plots.next_token_law import LENS_COLORS, MODEL_COLORS
    from workbench.plots.theme import OKABE_ITO
    from workbench.plots.token_alignment import METHOD_COLORS
    from workbench.plots.tokenization_bias import ESTIMATE_COLORS
    from workbench.plots.tokenizers import VERDICT_COLORS

    def closest_pair(colours, cvd):
        srgb = np.array([[int(c.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)] for c in colours])
        seen = np.clip(cspace_convert(srgb, {"name": "sRGB1+CVD", "cvd_type": cvd, "severity": 100}, "sRGB1"), 0, 1)
        ucs = cspace_convert(seen, "sRGB1", "CAM02-UCS")
        return min(np.linalg.norm(a - b) for a, b in itertools.combinations(ucs, 2))

    palettes = {"colorway": OKABE_ITO, "byte-level estimates": list(COLORS.values()),
                "markov-chain estimates": list(ESTIMATE_COLORS.values()), "alignment methods": list(METHOD_COLORS.values()),
                "next-token-law models": list(MODEL_COLORS), "lenses": list(LENS_COLORS.values()),
                "tokenizer verdicts": list(VERDICT_COLORS.values()), "byte-level bars": [MODEL_COLOR, ENSEMBLE_COLOR]}
    for name, colours in palettes.items():
        for cvd in ("deuteranomaly", "protanomaly", "tritanomaly"):
            assert closest_pair(colours, cvd) >= 10, (name, cvd)
    assert closest_pair(["#1f77b4", "#d62728", "#2ca02c"], "deuteranomaly") < 10  # the old red / green: the check can fail


SVG = "{http://www.w3.org/2000/svg}"
GALLERY = Path(__file__).resolve().parents[1] / "gallery"


def _offset_y(element) -> float:
    match = re.search(r"translate\(([-\d.]+)[ ,]*([-\d.]+)?\)", element.get("transform") or "")
    return float(match[2] or 0) if match else 0.0


def legend_entries_past_the_box(svg: Path) -> list[tuple[str, float, float]]:
    """(entry text, its y, the legend box's height) for each legend entry drawn below its legend's box: plotly
    clips a legend taller than the room it has, so those series are drawn but never named."""
    hidden = []
    for legend in ET.parse(svg).getroot().iter(SVG + "g"):
        if legend.get("class") != "legend":
            continue
        height = float(next(r for r in legend.iter(SVG + "rect") if r.get("class") == "bg").get("height"))
        for group in (g for g in legend.iter(SVG + "g") if g.get("class") == "groups"):
            for entry in (g for g in group if g.get("class") == "traces"):
                y = _offset_y(group) + _offset_y(entry)
                if y > height:
                    hidden.append(("".join(t.text or "" for t in entry.iter(SVG + "text")), y, height))
    return hidden


def test_a_legend_too_tall_for_its_figure_is_caught(tmp_path):
    from workbench.plots.export import export_figure

    fig = go.Figure([go.Scatter(x=[0, 1], y=[i, i], name=f"series {i}", legendgroup=str(i)) for i in range(12)])
    fig.update_layout(legend=dict(tracegroupgap=30))
    svg, = export_figure(fig, tmp_path / "tall", formats=("svg",), columns="one", height=150)
    assert legend_entries_past_the_box(svg)  # the last series are clipped away
    fig.update_layout(legend=dict(tracegroupgap=0, orientation="h", y=-0.3))
    svg, = export_figure(fig, tmp_path / "fits", formats=("svg",), columns="one", height=300)
    assert legend_entries_past_the_box(svg) == []


@pytest.mark.parametrize("svg", sorted(GALLERY.rglob("*.svg")), ids=lambda p: str(p.relative_to(GALLERY)))
def test_every_gallery_legend_names_every_series(svg):
    assert legend_entries_past_the_box(svg) == []
