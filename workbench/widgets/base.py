"""What every explorer shares: layout, the same controls for the same things, background work with a busy
line, linked-view highlights, an export box and notebook display.

How an explorer stays responsive: every control change calls :meth:`Explorer.update`. When everything the
current view needs is at hand (precomputed or cached), it redraws at once, in the calling thread. When
something must be computed first (a capture, a byte-level walk), :meth:`Explorer.pending_work` names it;
one background thread computes it, and then draws; work still running after :data:`BUSY_AFTER_S` gets a busy
line saying what is going on (quicker work draws without a flicker). The thread
always computes what the controls show *now*: positions the slider passed while that work ran are never
computed (no queue of captures while dragging). :meth:`Explorer.wait` blocks until the view is current;
:meth:`Explorer.export` calls it, so code that sets a control and exports gets the new view.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..plots.export import FORMATS, figure_folder, unused_stem

SELECTED = "#d55e00"  # Okabe-Ito vermillion: what is selected in one view, outlined in the others
BUSY_AFTER_S = 0.2  # background work still running after this long shows the busy line


def row(*children: widgets.Widget) -> widgets.Box:
    """Controls or figures side by side while they fit the notebook's width, wrapped onto the next line
    when they do not (two 700-px figures stack in a 1280-px window instead of running off the page)."""
    return widgets.Box(list(children), layout=widgets.Layout(display="flex", flex_flow="row wrap",
                                                             align_items="flex-start", width="100%"))


def layer_slider(n_layers: int, value: int | None = None, *, description: str = "layer") -> widgets.IntSlider:
    """The layer slider of every explorer: 0 .. n_layers - 1, middle layer by default, arrow keys step it."""
    value = n_layers // 2 if value is None else value
    return widgets.IntSlider(value=value, min=0, max=n_layers - 1, description=description,
                             layout=widgets.Layout(width="min(420px, 100%)"))


def prompt_options(texts, samples=None, *, width: int = 60) -> list[tuple[str, int]]:
    """``("<index>: <start of the text>", index)`` for each of ``samples`` (default: every prompt)."""
    samples = range(len(texts)) if samples is None else samples
    return [(f"{i}: {str(texts[i])[:width]}", i) for i in samples]


def prompt_dropdown(texts, *, first: list | None = None, width: int = 60) -> widgets.Dropdown:
    """The prompt selector of every explorer (:func:`prompt_options`), after any ``first`` options."""
    options = list(first or []) + prompt_options(texts, width=width)
    return widgets.Dropdown(options=options, value=options[0][1] if options else None, description="prompt",
                            layout=widgets.Layout(width="min(460px, 100%)"))


def _json_safe(value):
    """``value`` with NaN and infinities as None (gaps): the widget channel sends strict JSON, which has no NaN
    (a NaN anywhere, e.g. in a heatmap's customdata, makes the whole update fail to reach the page)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            out = value.astype(object)
            out[~np.isfinite(value)] = None
            return out.tolist()
        return _json_safe(value.tolist()) if value.dtype.kind == "O" else value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def show_figure(target: go.FigureWidget, source: go.Figure) -> None:
    """Make ``target`` draw ``source`` (its traces and layout), in one update of the page."""
    traces = [_json_safe(trace.to_plotly_json()) for trace in source.data]
    with target.batch_update():
        target.data = []
        target.add_traces(traces)
        target.layout = source.layout


@dataclass
class Work:
    """Something the current view needs computed first: ``label`` is shown while ``run()`` fills a cache."""

    label: str
    run: Callable[[], object]


class Explorer:
    """Subclasses build ``self.view`` (laid out with :func:`row`), call :meth:`_start_work` before their first
    :meth:`update`, implement ``draw()`` (fast: only what is at hand) and ``export(path_stem)``, and, when
    some view needs model work, ``pending_work()``."""

    view: widgets.Widget

    # ---------------------------------------------------------------- background work

    def _start_work(self) -> widgets.HTML:
        """The busy line, and the lock and thread state behind :meth:`update`."""
        self.busy = widgets.HTML(layout=widgets.Layout(min_height="1.6em"))
        self._lock = threading.RLock()  # re-entrant: draw() may set controls, whose observers call update()
        self._drawing = False
        self._worker: threading.Thread | None = None
        self._running: Work | None = None  # what the worker computes now (the busy line's subject)
        self._idle = threading.Event()
        self._idle.set()
        self.last_error: Exception | None = None
        return self.busy

    def pending_work(self) -> Work | None:
        """What the current control values need computed before :meth:`draw` can show them (None: nothing)."""
        return None

    def draw(self) -> None:
        raise NotImplementedError

    def update(self, _change=None) -> None:
        """Redraw for the current controls: now if nothing needs computing, else in the background."""
        with self._lock:
            if self._drawing:
                return  # a control set by draw() itself (this thread: the lock is re-entrant)
            if self._worker is not None:
                return  # the running thread draws the controls' state when it is done
            work = self.pending_work()
            if work is None:
                self._draw_locked()
            else:
                self._idle.clear()
                self._worker = threading.Thread(target=self._work_loop, daemon=True, name=type(self).__name__)
                self._worker.start()

    def _draw_locked(self) -> None:
        self._drawing = True
        try:
            self.draw()
            self.busy.value = ""
        except Exception as err:  # shown in the view, not raised into the notebook's event loop
            self.last_error = err
            self.busy.value = f"<span style='color:#b00'><b>could not draw</b>: {html.escape(str(err))}</span>"
        finally:
            self._drawing = False

    def _show_busy_if_still_running(self, work: Work) -> None:
        with self._lock:
            if self._running is work:
                self.busy.value = (f"<span style='color:#555'>&#8987; {html.escape(work.label)} ... "
                                   "(the view below still shows the previous state)</span>")

    def _work_loop(self) -> None:
        """Compute what the controls show now, again and again until nothing is missing; then draw and stop."""
        while True:
            with self._lock:
                work = self.pending_work()
                if work is None:
                    self._draw_locked()
                    self._worker = None
                    self._idle.set()
                    return
                self._running = work
                if self.busy.value:  # already showing earlier work: name this one at once
                    self._show_busy_if_still_running(work)
            timer = threading.Timer(BUSY_AFTER_S, self._show_busy_if_still_running, args=(work,))
            timer.daemon = True
            timer.start()
            try:
                work.run()
            except Exception as err:
                self.last_error = err
                with self._lock:
                    self._running = None
                    self.busy.value = (f"<span style='color:#b00'><b>failed</b> while {html.escape(work.label)}: "
                                       f"{html.escape(str(err))}</span>")
                    self._worker = None
                    self._idle.set()
                return
            finally:
                timer.cancel()
            with self._lock:
                self._running = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the view shows the current controls (raises what the background work raised)."""
        if not self._idle.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} is still computing after {timeout} s")
        if self.last_error is not None:
            err, self.last_error = self.last_error, None
            raise err

    # ---------------------------------------------------------------- export

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
