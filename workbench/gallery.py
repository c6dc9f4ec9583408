"""Regenerate the gallery from saved runs: the worked example's figures and the index of every study's page."""

from __future__ import annotations

from pathlib import Path

from .plots.export import FORMATS, export_figure
from .runs import write_text_atomic

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
    parts += figure_captions(out_dir)
    path = out_dir / "README.md"
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path


_COMMANDS = [  # which command writes a figure, by the start of its caption key (first match)
    ("residual_norm_", "workbench demo"), ("extreme_tokens/", "workbench extreme-tokens"),
    ("next_token_law/", "workbench next-token-law"), ("geometry/", "workbench geometry"),
    ("tokenizers/", "workbench tokenizers"), ("tokenization_bias/token_alignment", "workbench token-alignment"),
    ("tokenization_bias/error_vs_steps", "workbench tokenization-bias"),
    ("tokenization_bias/transition_heatmaps", "workbench tokenization-bias"),
    ("tokenization_bias/ensemble_intervals", "workbench byte-ensemble"), ("tokenization_bias/", "workbench byte-level"),
]


def caption_key(relative: str | Path) -> str:
    """The key of a figure in ``gallery_captions.CAPTIONS``: its path under the gallery without the extension,
    a per-model folder or suffix written ``{model}``."""
    from .studies.registry import STUDIES

    key = Path(relative).with_suffix("").as_posix()
    for model in sorted({m for s in STUDIES.values() for m in s.default_models}, key=len, reverse=True):
        key = key.replace(f"/{model}/", "/{model}/").replace(f"_{model}", "_{model}")
    return key


def figure_captions(out_dir: str | Path) -> list[str]:
    """The index's caption list: every SVG under ``out_dir``, what it shows and the claim it illustrates."""
    from .gallery_captions import CAPTIONS

    out_dir = Path(out_dir)
    lines = ["## Figure captions\n",
             "Every figure in this folder, what it shows and the paper claim it illustrates. Models: the embedded "
             "SmolLM2-135M and Gemma 3 270M, from their 4-bit GGUF files dequantised to float32; the command is the "
             "one that made the figure's folder (above).\n"]
    for svg in sorted(out_dir.rglob("*.svg")):
        if "screenshots" in svg.parts:
            continue
        relative = svg.relative_to(out_dir)
        key = caption_key(relative)
        # a figure a study writes before its caption is written (tests keep gallery/ complete) still gets a line
        caption, claim = CAPTIONS.get(key, ("(no caption yet: add one to workbench/gallery_captions.py)", ""))
        command = next(c for prefix, c in _COMMANDS if key.startswith(prefix))
        lines.append(f"- [{relative.with_suffix('').as_posix()}]({relative.as_posix()}) (`{command}`): {caption} *{claim}*")
    return lines + [""]
