"""Export figures for papers: SVG, PDF and PNG (via kaleido and the system Chromium), in the publication theme."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import plotly.graph_objects as go

from .theme import publication_layout

FORMATS = ("svg", "pdf", "png")
PNG_SCALE = 4  # 72 px/in layout * 4 = 288 dpi raster


class ExportError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """A Chrome/Chromium that kaleido can drive, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def figure_folder() -> Path:
    """Where figures go unless told otherwise: ``$WORKBENCH_FIGURES``, else ``~/workbench-figures``.

    Outside any repository, so exporting from a notebook in a checkout leaves no untracked files.
    """
    return Path(os.environ.get("WORKBENCH_FIGURES") or Path.home() / "workbench-figures").expanduser()


def unused_stem(path_stem: str | Path, formats=FORMATS) -> Path:
    """``path_stem``, or ``path_stem-2``, ``-3``, ...: the first for which no ``<stem>.<format>`` exists yet.

    What the explorers' export button writes to, so that a second click never overwrites the first.
    """
    stem = Path(path_stem).expanduser()
    candidate, k = stem, 1
    while any(candidate.with_name(f"{candidate.name}.{fmt}").exists() for fmt in formats):
        k += 1
        candidate = stem.with_name(f"{stem.name}-{k}")
    return candidate


def export_figure(
    fig: go.Figure, path_stem: str | Path, *, formats=FORMATS, columns: str | None = "one", height: int | None = None
) -> list[Path]:
    """Write ``fig`` as ``path_stem.<fmt>`` for each format; return the written paths.

    ``columns``: "one" or "two" applies the publication theme sized for that width;
    ``None`` keeps the figure's own layout.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}.")
    if find_chromium() is None:
        raise ExportError(
            "static export needs Chrome or Chromium for kaleido: `apt-get install chromium` "
            "(`make demo` installs it when missing)."
        )
    fig = go.Figure(fig)
    if columns is not None:
        publication_layout(fig, columns=columns, height=height)
    for i, trace in enumerate(fig.data):  # plotly draws random trace ids into the SVG otherwise
        trace.uid = f"trace-{i}"
    stem = Path(path_stem).expanduser()
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create {stem.parent}: {err.strerror}.") from err
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    import plotly.io as pio

    # write_images ignores the layout's size unless it is passed explicitly (plotly 6 / kaleido 1).
    width, height = fig.layout.width or 700, fig.layout.height or 500
    import logistro  # choreographer's loggers: made through logistro (a plain logging.getLogger here, before
    # choreographer is imported, would register a logger without logistro's debug2 and break it)

    pipe_log = logistro.getLogger("choreographer.channels.pipe")
    pipe_log.addFilter(_skip_torn_messages)
    # written beside the targets, checked, then renamed into place: an interrupted or failed export
    # leaves the old files whole, never half-written ones
    scratch = Path(tempfile.mkdtemp(dir=stem.parent, prefix=f".{stem.name}.export-"))
    try:
        drafts = [scratch / p.name for p in paths]
        try:
            pio.write_images(
                [fig] * len(drafts), drafts, format=list(formats),
                scale=[PNG_SCALE if f == "png" else 1 for f in formats],
                width=[width] * len(drafts), height=[height] * len(drafts),
            )
        finally:
            pipe_log.removeFilter(_skip_torn_messages)
        empty = [p for p, d in zip(paths, drafts) if not d.exists() or d.stat().st_size == 0]
        if empty:
            raise ExportError(f"kaleido wrote nothing to {', '.join(map(str, empty))}; run the export again.")
        for draft in drafts:
            _make_reproducible(draft)
        for draft, path in zip(drafts, paths):
            os.replace(draft, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return paths


_SVG_UID = re.compile(rb'id="defs-([0-9a-f]{6})"')
_PDF_DATE = re.compile(rb"/(CreationDate|ModDate) \(D:\d{14}")


def _make_reproducible(path: Path) -> None:
    """The same figure gives the same bytes: plotly.js names the SVG's clip paths and defs after a random
    6-hex id, and Chromium stamps the PDF with the time. Both are replaced in place by fixed values of the
    same length (the PDF's byte offsets stay valid). PNGs carry neither."""
    data = path.read_bytes()
    if path.suffix == ".svg":
        found = _SVG_UID.search(data)
        if found:  # the id follows a letter or a dash wherever plotly uses it: defs-, clip, legend, ...
            data = re.sub(rb"(?<=[a-z-])" + found.group(1), b"000000", data)
    elif path.suffix == ".pdf":
        data = _PDF_DATE.sub(lambda m: b"/" + m.group(1) + b" (D:20000101000000", data)
    path.write_bytes(data)


def _skip_torn_messages(record: logging.LogRecord) -> bool:
    """Leave out choreographer's "JSONError decoding message. Ignoring" traceback.

    Now and then Chromium's reply reaches choreographer's pipe reader split across two reads; it logs
    the torn half with a full traceback (an error-looking block in a notebook cell, seen in the
    browser tests) and carries on. The export is checked instead: every file must exist and be
    non-empty, else :class:`ExportError`.
    """
    return record.getMessage() != "JSONError decoding message. Ignoring"
