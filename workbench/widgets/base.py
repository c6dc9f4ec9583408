"""What every explorer shares: an export box and notebook display."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets

from ..plots.export import FORMATS, figure_folder, unused_stem


def row(*children: widgets.Widget) -> widgets.Box:
    """Controls or figures side by side while they fit the notebook's width, wrapped onto the next line
    when they do not (two 700-px figures stack in a 1280-px window instead of running off the page)."""
    return widgets.Box(list(children), layout=widgets.Layout(display="flex", flex_flow="row wrap",
                                                             align_items="flex-start", width="100%"))


class Explorer:
    """Subclasses build ``self.view`` (an ipywidgets box, laid out with :func:`row`) and implement
    ``export(path_stem)``."""

    view: widgets.Widget

    def _export_controls(self, name: str) -> widgets.Box:
        """The export box: a path stem (default ``figure_folder() / name``) and a button that never overwrites."""
        self.export_path = widgets.Text(value=str(figure_folder() / name), description="export to",
                                        layout=widgets.Layout(width="min(36em, 100%)"))
        self.export_button = widgets.Button(description="Export view", icon="download")
        self.status = widgets.HTML()
        self.export_button.on_click(lambda _: self._export_clicked())
        return row(self.export_path, self.export_button, self.status)

    def export(self, path_stem: str | Path, formats=FORMATS) -> list[Path]:
        raise NotImplementedError

    def _export_clicked(self) -> None:
        """Write what is on screen to the stem in the box, or to ``<stem>-2``, ``-3``, ... if files of that name exist."""
        asked = Path(self.export_path.value).expanduser()
        stem = unused_stem(asked)
        self.status.value = "exporting ..."
        try:
            written = ", ".join(map(str, self.export(stem)))
        except Exception as err:  # shown to the user, not raised into the event loop
            self.status.value = f"<b>export failed</b>: {html.escape(str(err))}"
            return
        kept = "" if stem == asked else f" ({html.escape(asked.name)}.* exist and were kept)"
        self.status.value = f"wrote {html.escape(written)}{kept}"

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)
