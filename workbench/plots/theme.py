"""The publication theme: fonts, margins and sizes for one- and two-column figures.

Sizes are in CSS pixels at 72 px per inch, so a vector export (SVG/PDF) of a
one-column figure is 3.5 in wide and a two-column one 7.0 in, the column widths of
common two-column paper templates (ACL, NeurIPS two-column, IEEE).
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

COLUMN_WIDTH_PX = {"one": 252, "two": 504}  # 3.5 in and 7.0 in at 72 px/in
FONT = dict(family="Helvetica, Arial, sans-serif", size=9, color="#222")
TEMPLATE = "workbench_publication"
# Okabe & Ito's palette: distinguishable under every common colour-vision deficiency
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

# Registered once with plotly: any figure can use it (``template="simple_white+workbench_publication"``);
# publication_layout adds the size for one or two columns.
pio.templates[TEMPLATE] = go.layout.Template(
    layout=dict(
        font=FONT,
        colorway=OKABE_ITO,  # series without their own colour: the colour-blind-safe palette
        title_font_size=10,
        margin=dict(l=44, r=8, t=26, b=36),
        legend=dict(font_size=8, bgcolor="rgba(255,255,255,0.6)"),
        xaxis=dict(ticks="outside", ticklen=3, title_standoff=4),
        yaxis=dict(ticks="outside", ticklen=3, title_standoff=4),
    )
)


def publication_layout(fig: go.Figure, *, columns: str = "one", height: int | None = None) -> go.Figure:
    """Apply the theme (the registered ``workbench_publication`` template over ``simple_white``) in place,
    sized for ``columns`` ("one" or "two"), and return the figure."""
    if columns not in COLUMN_WIDTH_PX:
        raise ValueError(f"columns must be 'one' or 'two', got {columns!r}.")
    width = COLUMN_WIDTH_PX[columns]
    fig.update_layout(
        template=f"simple_white+{TEMPLATE}",
        width=width,
        height=height or round(width * (0.75 if columns == "one" else 0.45)),
    )
    # a figure's own margins, fonts and axis styles win over a template: set the theme's explicitly too
    template = pio.templates[TEMPLATE].layout
    # (legend styles merged key by key: assigning the template's legend object would drop the figure's own placement)
    fig.update_layout(font=FONT, title_font_size=10, margin=template.margin, colorway=OKABE_ITO,
                      legend_font_size=template.legend.font.size, legend_bgcolor=template.legend.bgcolor)
    if fig.layout.annotations:  # subplot titles: theme-sized, with room under the figure title
        fig.update_annotations(font_size=9)
        fig.update_layout(margin_t=40)
    fig.update_xaxes(ticks="outside", ticklen=3, title_standoff=4)
    fig.update_yaxes(ticks="outside", ticklen=3, title_standoff=4)
    return fig
