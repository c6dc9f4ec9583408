"""The publication theme keeps a figure's own legend placement (it styles the legend, it does not replace it)."""

import plotly.graph_objects as go

from workbench.plots.theme import publication_layout


def test_theme_keeps_legend_placement():
    fig = go.Figure(go.Scatter(x=[1], y=[1], name="a"))
    fig.update_layout(legend=dict(x=0.1, y=0.2, orientation="h"))
    publication_layout(fig)
    assert (fig.layout.legend.x, fig.layout.legend.y, fig.layout.legend.orientation) == (0.1, 0.2, "h")
    assert fig.layout.legend.font.size == 8
