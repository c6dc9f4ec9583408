"""Export figures for papers (SVG, PDF, PNG via kaleido) and regenerate the gallery from saved runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import plotly.graph_objects as go

from .plots import publication_layout

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
    stem = Path(path_stem).expanduser()
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create {stem.parent}: {err.strerror}.") from err
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    import plotly.io as pio

    # write_images ignores the layout's size unless it is passed explicitly (plotly 6 / kaleido 1).
    width, height = fig.layout.width or 700, fig.layout.height or 500
    pio.write_images(
        [fig] * len(paths), paths, format=list(formats), scale=[PNG_SCALE if f == "png" else 1 for f in formats],
        width=[width] * len(paths), height=[height] * len(paths),
    )
    return paths


def write_residual_norm_gallery(run, out_dir: str | Path, formats=FORMATS) -> list[Path]:
    """The residual-norm figures of the worked example, from a saved run."""
    from .analyses import residual_norm_peaks, residual_norms
    from .plots import residual_norm_by_position, residual_norm_heatmap, residual_norm_profile

    norms = residual_norms(run).load()
    out_dir = Path(out_dir)
    mid = norms.sizes["layer"] // 2
    figures = {
        "residual_norm_heatmap": (residual_norm_heatmap(norms, 0), "two"),
        "residual_norm_profile": (residual_norm_profile(residual_norm_peaks(run).load(), 0), "one"),
        "residual_norm_by_position": (residual_norm_by_position(norms, 0, mid), "two"),
    }
    written = []
    for name, (fig, columns) in figures.items():
        written += export_figure(fig, out_dir / name, formats=formats, columns=columns)
    return written


def write_gallery_index(out_dir: str | Path) -> Path:
    """``README.md`` of the gallery: every registered study's table (copied from its own page) with a link to it."""
    from .studies.registry import STUDIES

    out_dir = Path(out_dir)
    commands = ", ".join(f"`workbench {name}`" for name in STUDIES)
    parts = [
        "# Gallery\n",
        "Figures for papers (SVG/PDF/PNG at one- or two-column width) and the result tables, all made by",
        f"commands from saved runs: `workbench demo`, {commands}; `workbench gallery`",
        "redraws every figure and this index from what is saved under `runs/`.\n",
        "## Residual norms (worked example)\n",
        "[heatmap](residual_norm_heatmap.svg), [profile](residual_norm_profile.svg), "
        "[by position](residual_norm_by_position.svg)\n",
    ]
    for name, title in ((study.page, study.title) for study in STUDIES.values()):
        page = out_dir / name
        if not page.exists():
            continue
        body = page.read_text(encoding="utf-8").split("\n")
        if body and body[0].startswith("# "):
            body = body[1:]
        # Links in the page are relative to its own folder.
        prefix = str(Path(name).parent)
        text = "\n".join(body).strip()
        if prefix != ".":
            text = text.replace("](", f"]({prefix}/").replace(f"]({prefix}/http", "](http")
        parts += [f"## {title}\n", f"From [{name}]({name}).\n", text.replace("\n## ", "\n### "), ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
