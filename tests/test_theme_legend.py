"""The publication theme keeps a figure's own legend placement (it styles the legend, it does not replace it)."""

import plotly.graph_objects as go

from workbench.plots.theme import publication_layout


def test_theme_keeps_legend_placement():
    fig = go.Figure(go.Scatter(x=[1], y=[1], name="a"))
    fig.update_layout(legend=dict(x=0.1, y=0.2, orientation="h"))
    publication_layout(fig)
    assert (fig.layout.legend.x, fig.layout.legend.y, fig.layout.legend.orientation) == (0.1, 0.2, "h")
    assert fig.layout.legend.font.size == 8


def test_series_colours_stay_apart_under_colour_vision_deficiencies():
    """The palettes that tell series apart (the theme's Okabe-Ito colorway; exact / naive / token healing) keep every
    pair at least 10 CAM02-UCS units apart under simulated full deuteranopia, protanopia and tritanopia
    (colorspacious, Machado et al. 2009). The red / green pair these figures used before fails it."""
    import itertools

    import numpy as np
    from colorspacious import cspace_convert

    from workbench.plots.byte_level import COLORS
    from workbench.plots.theme import OKABE_ITO

    def closest_pair(colours, cvd):
        srgb = np.array([[int(c.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)] for c in colours])
        seen = np.clip(cspace_convert(srgb, {"name": "sRGB1+CVD", "cvd_type": cvd, "severity": 100}, "sRGB1"), 0, 1)
        ucs = cspace_convert(seen, "sRGB1", "CAM02-UCS")
        return min(np.linalg.norm(a - b) for a, b in itertools.combinations(ucs, 2))

    for name, colours in {"colorway": OKABE_ITO, "estimates": list(COLORS.values())}.items():
        for cvd in ("deuteranomaly", "protanomaly", "tritanomaly"):
            assert closest_pair(colours, cvd) >= 10, (name, cvd)
    assert closest_pair(["#1f77b4", "#d62728", "#2ca02c"], "deuteranomaly") < 10  # the old red / green: the check can fail
