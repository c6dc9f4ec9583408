"""Exact byte-level probabilities on real text: where the naive answer is biased, and a two-vocabulary ensemble.

Reproduces, on the embedded models and the bundled pydoc corpus, two claims of "Exact
Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles"
(Phan et al., 2024; the bias itself: "Understanding and Mitigating Tokenization Bias in
Language Models"): prompting with the encoded prefix gives biased next-byte probabilities,
worst when the prompt ends inside a token (mid-word, after a trailing space), which token
healing only partly repairs; and once each model is an exact byte-level model, models with
different vocabularies (SmolLM2: 49k byte-level BPE; Gemma 3: 262k SentencePiece) can be
averaged byte by byte.

``run_study(folder)`` computes :func:`~workbench.analyses.byte_bias.bias_along_text` on one
real paragraph for each model (``bias_<model>.nc``), the cover encodings at one example cut
(``covers_<model>.nc``) and :func:`~workbench.analyses.byte_bias.ensemble_bits_per_byte` on
held-out paragraphs with the mixture weight chosen on a separate validation paragraph
(``ensemble.nc``). ``summary`` and ``write_figures`` work from the saved files alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses.byte_bias import (
    PAPER,
    bias_along_text,
    cover_encodings,
    ensemble_bits_per_byte,
)
from ..analyses.byte_level import ByteLevelModel
from ..corpus import paragraphs
from ..plots.export import export_figure
from ..threads import single_thread
from ..plots.byte_level import (
    bias_along_text_figure,
    bits_per_byte_figure,
    covers_table,
    next_byte_bars,
)
from ..runs import open_result, save_result
from .staging import staged_folder
from .tables import markdown_table

ENSEMBLE_FILE = "ensemble.nc"


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs on; the defaults are the committed experiment (paragraph indices into ``corpus.paragraphs()``).

    The default bias paragraph ("A "break" statement ...", 234 bytes) has a curly apostrophe
    (3 UTF-8 bytes), so some cuts fall inside a character. The held-out paragraphs are the
    corpus's last two; the validation paragraph, used only to pick the mixture weight, comes
    before them and is not scored.
    """

    models: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
    bias_paragraph: int = -7
    test_paragraphs: tuple[int, ...] = (-2, -1)
    validation_paragraph: int = -4
    example_window: int = 64  # the example cut: the largest naive TV among mid-token cuts after a space, in these bytes
    n_covers: int = 8
    weight_step: float = 0.1
    prune: float = 1e-5
    max_hypotheses: int = 32


def _file(folder: Path, kind: str, model: str) -> Path:
    return folder / f"{kind}_{model}.nc"


def example_cut(bias: xr.Dataset, window: int) -> int:
    """The cut shown in the next-byte and cover figures: after a space, inside a token, where naive is furthest off."""
    first = bias.isel(byte_pos=slice(0, window))
    candidates = first["after_space"] & ~first["token_boundary"]
    if not bool(candidates.any()):
        candidates = ~first["token_boundary"]
    tv = first["total_variation"].sel(baseline="naive").where(candidates)
    return int(first["byte_pos"].values[int(np.nanargmax(tv.values))])


def run_study(folder: str | Path, config: StudyConfig = StudyConfig(), *, handles: dict | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Compute everything and save it under ``folder`` (``.partial`` first, renamed when complete); return the folder.

    ``handles``: ``{name: ModelHandle}`` to use instead of loading ``config.models``.
    """
    import workbench as wb

    with staged_folder(folder, overwrite) as work:
        started = time.perf_counter()
        handles = handles or {name: wb.load_model(name) for name in config.models}
        texts = paragraphs()
        paragraph = texts[config.bias_paragraph]
        kwargs = dict(prune=config.prune, max_hypotheses=config.max_hypotheses)
        setup = {"config": json.dumps(asdict(config)), "paper": PAPER}
        with single_thread():
            cut = None
            for name, handle in handles.items():
                bias = bias_along_text(handle, paragraph, progress=progress, **kwargs)
                cut = example_cut(bias, config.example_window) if cut is None else cut
                save_result(bias.assign_attrs(setup), _file(work, "bias", name))
                prefix = paragraph.encode("utf-8")[:cut]
                covers = cover_encodings(ByteLevelModel(handle, **kwargs), prefix, top=config.n_covers)
                save_result(covers.assign_attrs(example_cut=cut), _file(work, "covers", name))
            ensemble = ensemble_bits_per_byte(handles, [texts[i] for i in config.test_paragraphs],
                                              texts[config.validation_paragraph], weight_step=config.weight_step,
                                              progress=progress, **kwargs)
        ensemble.attrs.update(setup, example_cut=cut, study_seconds=round(time.perf_counter() - started, 1))
        save_result(ensemble, work / ENSEMBLE_FILE)
    return Path(folder)


def load_study(folder: str | Path) -> dict:
    """``{"ensemble": Dataset, "bias": {model: Dataset}, "covers": {model: Dataset}}`` from a :func:`run_study` folder."""
    folder = Path(folder)
    if not (folder / ENSEMBLE_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no byte-level study ({ENSEMBLE_FILE} missing); run run_study() first.")
    ensemble = open_result(folder / ENSEMBLE_FILE)
    models = [str(m) for m in ensemble["member"].values]
    return {
        "ensemble": ensemble,
        "bias": {m: open_result(_file(folder, "bias", m)) for m in models},
        "covers": {m: open_result(_file(folder, "covers", m)) for m in models},
    }


def _mean(values: xr.DataArray, where) -> str:
    picked = values.values[np.asarray(where)]
    return f"{picked.mean():.3f} (n={picked.size})" if picked.size else "none"


def summary_rows(folder: str | Path) -> list[dict]:
    """One row per model and ensemble: bits per byte, calls per byte, mean TV to exact by kind of cut."""
    study = load_study(folder)
    ens = study["ensemble"]
    rows = []
    for model in [str(m) for m in ens["model"].values]:
        one = ens.sel(model=model)
        label = model
        if model == "ensemble_tuned":
            label = "ensemble, tuned (" + "/".join(f"{w:.1f}" for w in one["weight"].values) + ")"
        row = {
            "model": label,
            f"bits per byte, exact, {ens.attrs['total_bytes']} held-out bytes": f"{float(one['bits_per_byte']):.4f}",
            "bits per byte by paragraph": ", ".join(f"{v:.3f}" for v in one["bits_per_byte_by_text"].values),
            "token-level bits per byte (canonical tokenization)": (
                f"{float(one['token_level_bits_per_byte']):.4f}" if np.isfinite(one["token_level_bits_per_byte"]) else ""),
            "model calls per byte": f"{float(one['calls_per_byte']):.2f}",
        }
        if model in study["bias"]:
            bias = study["bias"][model]
            boundary = bias["token_boundary"].values
            space = bias["after_space"].values & ~boundary
            other = ~boundary & ~bias["after_space"].values
            for baseline, name in (("naive", "naive"), ("token_healing", "token healing")):
                tv = bias["total_variation"].sel(baseline=baseline)
                row[f"mean TV {name} vs exact: token-boundary cuts"] = _mean(tv, boundary)
                row[f"mean TV {name} vs exact: mid-token cuts after a space"] = _mean(tv, space)
                row[f"mean TV {name} vs exact: other mid-token cuts"] = _mean(tv, other)
            bits = -bias["logprob"].sum("byte_pos") / (bias.attrs["n_bytes"] * np.log(2))
            row[f"bias paragraph ({bias.attrs['n_bytes']} bytes), bits per byte exact / token healing / naive"] = (
                " / ".join(f"{float(bits.sel(estimate=e)):.3f}" for e in ("exact", "token_healing", "naive")))
        rows.append(row)
    return rows


def summary(folder: str | Path) -> str:
    """The study's numbers as a markdown table under a line describing the set-up."""
    study = load_study(folder)
    ens = study["ensemble"]
    config = json.loads(ens.attrs["config"])
    bias = next(iter(study["bias"].values()))

    def start(text: str) -> str:
        return "“" + " ".join(text.split()[:5]) + " …”"

    held_out = ", ".join(start(t) for t in json.loads(ens.attrs["texts"]))
    setup = (
        f"Held-out text: the last {len(config['test_paragraphs'])} paragraphs of the bundled pydoc corpus, {held_out} "
        f"({ens.attrs['total_bytes']} bytes); mixture weight chosen on an earlier paragraph, "
        f"{start(ens.attrs['validation_text'])} ({ens.attrs['validation_bytes']} bytes, grid step "
        f"{config['weight_step']}). Bias along text: {start(bias.attrs['text'])} ({bias.attrs['n_bytes']} bytes), "
        f"every byte cut. Exact model: prune {config['prune']}, at most "
        f"{config['max_hypotheses']} tokenizations followed. TV = total variation distance of the next-byte "
        f"distribution to the exact one (0 to 1). Study time: {ens.attrs.get('study_seconds', '?')} s "
        "(one CPU thread, shared machine)."
    )
    return setup + "\n\n" + markdown_table(summary_rows(folder)) + "\n"


def write_summary(folder: str | Path, path: str | Path) -> Path:
    """Write :func:`summary` (markdown, with links to the figures next to it) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = "\n".join(f"- [{stem}]({stem}.svg)" for stem in FIGURES)
    path.write_text(
        "# Exact byte-level probabilities on real text\n\n"
        "\"Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles\" "
        "(Phan et al., 2024) on SmolLM2-135M and Gemma 3 270M.\n\n" + summary(folder) + "\n## Figures\n\n" + figures + "\n"
    )
    return path


FIGURES = ("bias_along_text", "next_byte_bars", "covers_table", "bits_per_byte")


def write_figures(folder: str | Path, out_dir: str | Path, formats=("svg", "pdf", "png"),
                  window: int = 64) -> list[Path]:
    """Into ``out_dir``: the bias along the paragraph (first ``window`` bytes, one row per model), the example
    cut's next-byte bars and cover encodings (first model), and bits per byte of models and ensembles."""
    study = load_study(folder)
    out_dir = Path(out_dir)
    first = next(iter(study["bias"]))
    cut = int(study["ensemble"].attrs["example_cut"])
    bias, covers = study["bias"][first], study["covers"][first]
    figures = {
        "bias_along_text": (bias_along_text_figure(study["bias"], stop=window), "two", 360),
        "next_byte_bars": (next_byte_bars(bias.sel(byte_pos=cut), title=None), "two", 240),
        "covers_table": (covers_table(covers), "two", 80 + 20 * (covers.sizes["cover"] + 2)),
        "bits_per_byte": (bits_per_byte_figure(study["ensemble"]), "one", 240),
    }
    written = []
    for name, (fig, columns, height) in figures.items():
        written += export_figure(fig, out_dir / name, formats=formats, columns=columns, height=height)
    return written
