"""The study registry: one entry per study, from which the CLI, the gallery and the README tables are made.

Each :class:`Study` says what the study is called, which options it takes, where its results
are saved, how to run it and how to redraw its figures and its gallery page from saved results.
``workbench <study>`` commands are generated from these entries (:func:`workbench.cli`),
``workbench gallery`` walks them, ``gallery/README.md`` indexes their pages in this order, and
:func:`sync_readme_tables` copies each page's table into the README between markers, so the
README's numbers are always the gallery's (tested). Adding a phenomenon: an analysis module, a
plot module, one entry here, tests and a notebook.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional


RUNS = Path("runs")


def saved_study(folder_name: str, start: str | Path = ".") -> Path | None:
    """``runs/<folder_name>`` as a ``workbench <study>`` command saved it, looked for in ``start`` (the working
    folder) and its parent, so a notebook in ``notebooks/`` finds what the CLI saved at the repository root;
    None when neither has it. Nothing is looked for next to the installed package."""
    start = Path(start).resolve()
    for base in (start, start.parent):
        if (base / RUNS / folder_name).is_dir():
            return base / RUNS / folder_name
    return None

# Where the numbers come from, for every table of a study on the embedded models.
EMBEDDED_WEIGHTS_NOTE = ("Weights: the embedded 4-bit GGUF files (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M), "
                         "dequantised to float32 by transformers.")


@dataclass(frozen=True)
class Option:
    """A study option: its keyword, CLI flag, type, default and help."""

    name: str
    flag: str
    type: Any
    default: Any
    help: str
    canonical: Optional[Callable] = None  # value -> the form compared with a saved study's (e.g. '0-2' -> [0, 1, 2])

    def same(self, a, b) -> bool:
        """Whether two values of this option ask for the same study."""
        return a == b if self.canonical is None else self.canonical(a) == self.canonical(b)


@dataclass(frozen=True)
class Study:
    """A study: options, runner, where it saves, and the page its figures and table go to."""

    name: str  # the CLI command
    title: str  # the gallery index section
    help: str  # CLI help: first line a summary; says what it writes where
    folder: Path  # saved results (per model: one sub-folder per model)
    page: str  # gallery page, relative to the gallery folder
    saved_file: str  # a file that exists once a (model's) study is saved
    run: Callable  # (model name or None, folder, options dict, overwrite) -> None
    write: Callable  # (folders, out) -> (files written, table markdown)
    default_models: tuple[str, ...] = ()  # empty: the study is not per model
    options: tuple[Option, ...] = ()
    weights_note: bool = True  # the study runs the embedded models
    # (folder) -> {option: value} the saved results were made with, as the CLI spells them; None if not recorded
    saved_options: Optional[Callable] = None
    reuses_work: bool = False  # a rerun with other options reuses the saved study's work (else it starts afresh)

    def options_changed(self, folder: Path, options: dict) -> Optional[str]:
        """The options the saved results in ``folder`` were made with that differ from ``options``: "" if none
        differ (or the study takes none), None if the saved results do not record their options."""
        if self.saved_options is None or not self.options:
            return ""
        saved = self.saved_options(folder)
        if saved is None:
            return None
        by_name = {o.name: o for o in self.options}
        return ", ".join(f"{k}={saved[k]!r}" for k in saved
                         if k in options and k in by_name and not by_name[k].same(options[k], saved[k]))

    @property
    def per_model(self) -> bool:
        return bool(self.default_models)

    def folders(self, models=None) -> dict[str, Path]:
        if not self.per_model:
            return {"": self.folder}
        return {m: self.folder / _folder_name(m) for m in (models or self.default_models)}

    def is_saved(self, folder: Path) -> bool:
        return (folder / self.saved_file).exists()

    def saved_models(self) -> list[str]:
        """Per-model studies: the models with saved results (a study not per model: [""] if saved)."""
        if not self.per_model:
            return [""] if self.is_saved(self.folder) else []
        saved = {p.name for p in self.folder.glob("*") if self.is_saved(p)}
        return [m for m in self.default_models if m in saved] + sorted(saved - set(self.default_models))

    def run_missing(self, models, options: dict, recompute: bool, say: Callable[[str], None] = print) -> None:
        """Run the study for every model without saved results (all of them with ``recompute``)."""
        for model, folder in self.folders(models).items():
            replace = recompute
            if self.is_saved(folder) and not recompute:
                changed = self.options_changed(folder, options)
                if changed is None:
                    say(f"{model or self.name}: using saved results in {folder}; they do not record the options they "
                        "were made with (saved by an older version): --recompute to redo them with the options given")
                    continue
                if not changed:
                    say(f"{model or self.name}: using saved results in {folder} (--recompute to redo)")
                    continue
                reuse = ("reusing the work already done" if self.reuses_work else
                         "they are replaced once the new run is complete")
                say(f"{model or self.name}: the saved results in {folder} were made with {changed}; running again "
                    f"with the options given ({reuse})")
                replace = not self.reuses_work
            self.run(model or None, folder, options, replace)

    def write_gallery(self, models, out: Path) -> tuple[list[Path], str]:
        """Figures and the page from saved results; returns the files written and the page's table."""
        folders = self.folders(models)
        for model, folder in folders.items():
            if not self.is_saved(folder):
                raise FileNotFoundError(f"no saved {self.name} study{' for ' + model if model else ''} in {folder}; "
                                        f"run `workbench {self.name}{' --model ' + model if model else ''}`.")
        return self.write(folders, Path(out))


# --------------------------------------------------------------------------- the entries


def _folder_name(model: str) -> str:
    """Where a model's results go under the study folder: its name, or a folder's last part for a path."""
    return Path(model).expanduser().name if ("/" in model or "\\" in model) else model


def _load(name):
    import workbench as wb

    return wb.load_model(name)


def _parse_layers(spec: Optional[str]):
    """'0-5' or '2,7' -> [0, 1, ..., 5] / [2, 7]; None -> None (all layers)."""
    if not spec:
        return None
    layers = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            layers += list(range(int(a), int(b) + 1))
        else:
            layers.append(int(part))
    return layers


def _page(path: Path, title: str, intro: str, table: str, rest: str = "", note: bool = True) -> str:
    weights = f"\n{EMBEDDED_WEIGHTS_NOTE}\n" if note else ""
    from ..runs import write_text_atomic  # xarray: loaded only when writing
    write_text_atomic(path, f"# {title}\n\n{intro}\n\n{table}\n{weights}{rest}")
    return table


def _with_weights_note(page: Path) -> str:
    """Append the weights note to a page a study module wrote; returns the page's text as it was."""
    text = page.read_text(encoding="utf-8")
    from ..runs import write_text_atomic  # xarray: loaded only when writing
    write_text_atomic(page, text.rstrip("\n") + f"\n\n{EMBEDDED_WEIGHTS_NOTE}\n")
    return text


def _run_extreme_tokens(model, folder, options, overwrite):
    from . import extreme_tokens as study

    study.run_study(_load(model), folder, ablation_layers=_parse_layers(options.get("ablation_layers")), overwrite=overwrite)


def _write_extreme_tokens(folders: dict[str, Path], out: Path):
    from . import extreme_tokens as study
    from .tables import markdown_table

    written = []
    for name, folder in folders.items():
        written += study.write_figures(folder, out / "extreme_tokens" / name)
    table = markdown_table([study.summary(f) for f in folders.values()])
    figures = "\n".join(f"- {name}: " + ", ".join(f"[{p.stem}](extreme_tokens/{name}/{p.name})"
                                                   for p in sorted((out / "extreme_tokens" / name).glob("*.svg")))
                        for name in folders)
    _page(out / "extreme_tokens.md", "Extreme-token phenomena in the embedded models",
          "Produced by `workbench extreme-tokens` from the bundled domain samples (prose, code, math, repeated);\n"
          "regenerate the figures from saved results with `workbench gallery`.", table, f"\n## Figures\n\n{figures}\n")
    return written, table


def _run_next_token_law(model, folder, options, overwrite):
    from . import next_token_law as study

    study.run_study(_load(model), folder, tokens=options["tokens"], probe_tokens=options["probe_tokens"],
                    lens_tokens=options["lens_tokens"], lens_steps=options["lens_steps"], overwrite=overwrite)


def _write_next_token_law(folders: dict[str, Path], out: Path):
    from . import next_token_law as study
    from .tables import markdown_table

    written = study.write_figures(folders, out / "next_token_law")
    table = markdown_table([study.summary(folder) for folder in folders.values()])
    figures = "\n".join(f"- [{p.parent.name}/{p.stem}](next_token_law/{p.relative_to(out / 'next_token_law')})"
                        for p in sorted((out / "next_token_law").rglob("*.svg")))
    _page(out / "next_token_law.md", "Next-token laws across layers in the embedded models",
          "Produced by `workbench next-token-law` on the bundled pydoc corpus (He & Su's prediction residual PR_l,\n"
          "future-token probes, logit and tuned lens); regenerate the figures from saved results with `workbench gallery`.",
          table, f"\n## Figures\n\n{figures}\n")
    return written, table


def _run_tokenization_bias(model, folder, options, overwrite):
    from . import markov_chain as study

    study.run_study(folder, overwrite=overwrite)


def _write_tokenization_bias(folders: dict[str, Path], out: Path):
    from . import markov_chain as study

    results = study.load_study(folders[""])
    written = study.write_figures(results, out / "tokenization_bias")
    page = study.write_summary(results, out / "tokenization_bias" / "summary.md")  # toy models: no weights note
    written.append(page)
    return written, first_table(page.read_text(encoding="utf-8"))


def _run_byte_level(model, folder, options, overwrite):
    from . import byte_level as study

    study.run_study(folder, overwrite=True)


def _write_tokenization_page(study, folder: Path, out: Path, page_name: str):
    """Figures and page of a study with one saved folder, into GALLERY/tokenization_bias; its table."""
    written = study.write_figures(folder, out / "tokenization_bias")
    page = study.write_summary(folder, out / "tokenization_bias" / page_name)
    written.append(page)
    return written, first_table(_with_weights_note(page))


def _write_byte_level(folders: dict[str, Path], out: Path):
    from . import byte_level as study

    return _write_tokenization_page(study, folders[""], out, "byte_level.md")


def _run_byte_ensemble(model, folder, options, overwrite):
    from . import byte_ensemble as study

    config = study.StudyConfig(test_bytes=options["test_bytes"])
    # a saved study made with other options is replaced, reusing its scores; --recompute (overwrite) scores all again
    study.run_study(folder, config, overwrite=overwrite or (folder / study.RESULTS_FILE).exists(), reuse=not overwrite)


def _staged_options(folder: Path) -> Optional[dict]:
    from .staging import saved_options

    return saved_options(folder)


def _extreme_tokens_options(folder: Path) -> Optional[dict]:
    from .staging import saved_options

    saved = saved_options(folder)
    if saved is None:
        return None
    layers = saved["ablation_layers"]
    return {"ablation_layers": None if layers is None else ",".join(map(str, layers))}


def _summary_config(folder: Path) -> Optional[dict]:
    """The config a tokenizers or geometry study saved in its summary.json (None if it saved none)."""
    return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("config")


def _token_alignment_options(folder: Path) -> Optional[dict]:
    from . import token_alignment as study

    attrs = study.load_study(folder).attrs
    if "config" not in attrs:
        return None
    config = json.loads(attrs["config"])
    return {"prompts": config["n_prompts"], "seed": config["seed"],
            "back_offs": ",".join(str(k) for k in config["back_offs"])}


def _back_offs(spec: str) -> tuple[int, ...]:
    return tuple(int(k) for k in str(spec).split(",") if k.strip())


def _byte_ensemble_options(folder: Path) -> dict:
    from . import byte_ensemble as study

    return {"test_bytes": json.loads(study.load_study(folder).attrs["config"])["test_bytes"]}


def _write_byte_ensemble(folders: dict[str, Path], out: Path):
    from . import byte_ensemble as study

    return _write_tokenization_page(study, folders[""], out, "byte_ensemble.md")


def _run_token_alignment(model, folder, options, overwrite):
    from . import token_alignment as study

    config = study.StudyConfig(n_prompts=options["prompts"], seed=options["seed"],
                               back_offs=_back_offs(options["back_offs"]))
    study.run_study(_load(model), folder, config, overwrite=overwrite)


def _write_token_alignment(folders: dict[str, Path], out: Path):
    from . import token_alignment as study

    written = []
    for folder in folders.values():
        written += study.write_figures(folder, out / "tokenization_bias")
    page = study.write_summary(list(folders.values()), out / "tokenization_bias" / "token_alignment.md")
    written.append(page)
    return written, first_table(_with_weights_note(page))


def _run_tokenizers(model, folder, options, overwrite):
    from . import tokenizers as study

    config = study.StudyConfig(loss_articles=options["loss_articles"], verify_max=options["verify_max"],
                               sum_problems=options["sum_problems"])
    study.run_study(model, folder, config, overwrite=overwrite)


def _write_tokenizers(folders: dict[str, Path], out: Path):
    from . import tokenizers as study

    written = study.write_figures(folders, out / "tokenizers")
    page = out / "tokenizers.md"
    study.write_page(folders, out, page)
    written.append(page)
    return written, first_table(_with_weights_note(page))


def _run_geometry(model, folder, options, overwrite):
    from . import geometry as study

    config = study.StudyConfig(prompts=options["prompts"], prompt_tokens=options["prompt_tokens"],
                               shuffle_prompts=options["shuffle_prompts"], windows=options["windows"])
    study.run_study(_load(model), folder, config, overwrite=overwrite)


def _write_geometry(folders: dict[str, Path], out: Path):
    from . import geometry as study

    written = study.write_figures(folders, out / "geometry")
    page = out / "geometry.md"
    table = study.write_page(folders, out, page)
    written.append(page)
    _with_weights_note(page)
    return written, table


_MODELS = ("smollm2-135m", "gemma3-270m")

STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study(
            "extreme-tokens", "Extreme-token phenomena",
            "Attention sinks, value drains, residual peaks, massive activations, active/dormant heads: per model.\n\n"
            "Results are saved under runs/extreme_tokens/MODEL and reused unless --recompute; the figures go to "
            "GALLERY/extreme_tokens/MODEL and the table to GALLERY/extreme_tokens.md. About 15 min per model on 2 CPU cores.",
            RUNS / "extreme_tokens", "extreme_tokens.md", "run.zarr", _run_extreme_tokens, _write_extreme_tokens,
            default_models=_MODELS,
            options=(Option("ablation_layers", "--ablation-layers", Optional[str], None,
                            "e.g. '0-5' or '2,7'; default all layers.", canonical=_parse_layers),),
            saved_options=_extreme_tokens_options,
        ),
        Study(
            "next-token-law", "Next-token laws across layers",
            "He & Su's next-token law, future-token probes, logit and tuned lens: per model.\n\n"
            "Results are saved under runs/next_token_law/MODEL (the tuned lens as tuned_lens.nc) and reused unless "
            "--recompute; figures go to GALLERY/next_token_law, the table to GALLERY/next_token_law.md. "
            "About 10 min per model on 2 CPU cores.",
            RUNS / "next_token_law", "next_token_law.md", "pr.nc", _run_next_token_law, _write_next_token_law,
            default_models=_MODELS,
            options=(
                Option("tokens", "--tokens", int, 50_000, "Corpus tokens for the PR law (20% held out)."),
                Option("probe_tokens", "--probe-tokens", int, 30_000, "Corpus tokens for the future-token probes."),
                Option("lens_tokens", "--lens-tokens", int, 4096, "Tokens whose states train the tuned lens."),
                Option("lens_steps", "--lens-steps", int, 20, "KL steps after the least-squares start."),
            ),
            saved_options=_staged_options,
        ),
        Study(
            "tokenization-bias", "Tokenization bias: the Markov-chain ground truth",
            "Tokenization bias on a known Markov chain (Phan et al., 2024): MPE and BPE toy models, naive vs exact.\n\n"
            "Results (and checkpoints) are saved under runs/tokenization_bias and reused unless --recompute; figures "
            "and summary.md go to GALLERY/tokenization_bias. About 2 min on 2 CPU cores.",
            RUNS / "tokenization_bias", "tokenization_bias/summary.md", "results.nc", _run_tokenization_bias,
            _write_tokenization_bias, weights_note=False,
        ),
        Study(
            "byte-level", "Exact byte-level probabilities and ensembles",
            "Exact byte-level probabilities on real text (Phan et al., 2024): bias along a paragraph, SmolLM2 + Gemma "
            "ensemble.\n\nResults are saved under runs/byte_level and reused unless --recompute; figures and "
            "byte_level.md go to GALLERY/tokenization_bias. About 6 min on 2 CPU cores.",
            RUNS / "byte_level", "tokenization_bias/byte_level.md", "ensemble.nc", _run_byte_level, _write_byte_level,
        ),
        Study(
            "byte-ensemble", "The byte-level ensemble, measured",
            "SmolLM2 + Gemma 3 byte-level ensemble on held-out prose and code, with bootstrap confidence intervals.\n\n"
            "Each model, the equal-weight mixture, a weight and an online share chosen on a validation split. Results "
            "are saved under runs/byte_ensemble and reused unless --recompute; the figure and byte_ensemble.md go to "
            "GALLERY/tokenization_bias. About 2.4 h on 2 CPU cores (texts in chunks, one process per core). An "
            "interrupted run resumes where it stopped; a run with other --test-bytes scores only the texts not yet "
            "scored.",
            RUNS / "byte_ensemble", "tokenization_bias/byte_ensemble.md", "results.nc", _run_byte_ensemble,
            _write_byte_ensemble,
            options=(Option("test_bytes", "--test-bytes", int, 50_000, "Held-out test bytes per domain (prose, code)."),),
            saved_options=_byte_ensemble_options, reuses_work=True,
        ),
        Study(
            "token-alignment", "Token alignment",
            "Token alignment (Athiwaratkun et al., 2024): greedy completions of cut prose and code, plain vs aligned.\n\n"
            "Results are saved under runs/token_alignment/MODEL and reused unless --recompute; figures and "
            "token_alignment.md go to GALLERY/tokenization_bias. About 5 min per model on 2 CPU cores.",
            RUNS / "token_alignment", "tokenization_bias/token_alignment.md", "results.nc", _run_token_alignment,
            _write_token_alignment, default_models=("smollm2-135m",),
            options=(
                Option("prompts", "--prompts", int, 40, "Random cuts per domain (prose, code)."),
                Option("back_offs", "--back-offs", str, "1,2", "Back-offs compared with plain, e.g. 1,2.",
                       canonical=_back_offs),
                Option("seed", "--seed", int, 0, "Seed of the random cuts."),
            ),
            saved_options=_token_alignment_options,
        ),
        Study(
            "tokenizers", "Tokenizer diagnostics",
            "Tokenizer unfairness between 49 languages, under-trained tokens, digit and spelling artifacts: per model.\n\n"
            "--model takes an embedded name or a Hugging Face folder (a folder with only a tokenizer gets the "
            "tokenizer-only parts). Results are saved under runs/tokenizers/MODEL and reused unless --recompute; "
            "figures, the searchable under-trained table (CSV) and tokenizers.md go to GALLERY/tokenizers. "
            "About 6 min per model on 2 CPU cores.",
            RUNS / "tokenizers", "tokenizers.md", "summary.json", _run_tokenizers, _write_tokenizers,
            default_models=_MODELS,
            options=(
                Option("loss_articles", "--loss-articles", int, 5, "UDHR articles per language scored by the model."),
                Option("verify_max", "--verify-max", int, 600, "Candidates verified by prompting (lowest indicator first)."),
                Option("sum_problems", "--sum-problems", int, 20, "Random sums per operand length."),
            ),
            saved_options=_summary_config,
        ),
        Study(
            "geometry", "Token geometry and layerwise updates",
            "Token-cloud geometry (intrinsic dimension, neighbourhoods, shuffles), last-token trajectories, how layers "
            "update the residual, layer deletion and swaps, residual redundancy: per model.\n\n"
            "Results are saved under runs/geometry/MODEL and reused unless --recompute; figures and geometry.md go to "
            "GALLERY/geometry. About 10 min per model on 2 CPU cores.",
            RUNS / "geometry", "geometry.md", "summary.json", _run_geometry, _write_geometry, default_models=_MODELS,
            options=(
                Option("prompts", "--prompts", int, 32, "Corpus prompts for the geometry (and the update fits)."),
                Option("prompt_tokens", "--prompt-tokens", int, 512, "Tokens per prompt (at least 257 for GRIDE up to rank 256)."),
                Option("shuffle_prompts", "--shuffle-prompts", int, 8, "Prompts also run shuffled in 4**s blocks, s = 0..5."),
                Option("windows", "--windows", int, 400, "Last-token trajectories (windows of 32 corpus tokens, after the BOS where the model uses one)."),
            ),
            saved_options=_summary_config,
        ),
    ]
}


# --------------------------------------------------------------------------- README tables

_BLOCK = re.compile(r"(<!-- study-table: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /study-table -->)", re.S)


def first_table(markdown: str) -> str:
    """The first markdown table (consecutive lines starting with '|') of a page."""
    lines, table = markdown.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def readme_block(study: Study, gallery_dir: Path) -> str | None:
    """What the README shows for ``study``: its page's first table (and the weights note), or None if no page."""
    page = Path(gallery_dir) / study.page
    if not page.exists():
        return None
    table = first_table(page.read_text(encoding="utf-8"))
    return table + (f"\n\n{EMBEDDED_WEIGHTS_NOTE}" if study.weights_note else "") + "\n"


def sync_readme_tables(readme: Path, gallery_dir: Path) -> bool:
    """Rewrite every ``<!-- study-table: NAME -->`` block of ``readme`` from the gallery pages; True if changed."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")

    def replace(match):
        block = readme_block(STUDIES[match["name"]], gallery_dir)
        return match.group(0) if block is None else match.group(1) + block + match.group(4)

    new = _BLOCK.sub(replace, text)
    if new != text:
        from ..runs import write_text_atomic  # xarray: loaded only when writing
        write_text_atomic(readme, new)
    return new != text


def readme_tables(readme: Path) -> dict[str, str]:
    """The study tables the README shows, by study name."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(Path(readme).read_text(encoding="utf-8"))}
