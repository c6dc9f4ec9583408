"""What every explorer shares: an export box and notebook display."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets


def row(*children: widgets.Widget) -> widgets.Box:
    """Controls or figures side by side while they fit the notebook's width, wrapped onto the next line
    when they do not (two 700-px figures stack in a 1280-px window instead of running off the page)."""
    return widgets.Box(list(children), layout=widgets.Layout(display="flex", flex_flow="row wrap",
                                                             align_items="flex-start", width="100%"))


class Explorer:
    """Subclasses build ``self.view`` (an ipywidgets box, laid out with :func:`row`) and implement
    ``export(path_stem)``."""

    view: widgets.Widget

    def _export_controls(self, default_path: str) -> widgets.Box:
        self.export_path = widgets.Text(value=default_path, description="export to")
        self.export_button = widgets.Button(description="Export view", icon="download")
        self.status = widgets.HTML()
        self.export_button.on_click(lambda _: self._export_clicked())
        return row(self.export_path, self.export_button, self.status)

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        raise NotImplementedError

    def _export_clicked(self) -> None:
        try:
            self.status.value = "wrote " + ", ".join(map(str, self.export(self.export_path.value)))
        except Exception as err:  # shown to the user, not raised into the event loop
            self.status.value = f"<b>export failed</b>: {err}"

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)
