"""The ``workbench`` command: demo, capture, gallery, lab, models."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Look inside language models: capture, explore, export.")
console = Console()

DEMO_RUN = Path("runs/demo.zarr")
GALLERY_DIR = Path("gallery")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=1)


def _user_errors():
    from .analyses import MissingProbeError
    from .gallery import ExportError
    from .models import ModelNotAvailableError
    from .runs import RunExistsError
    from .schema import InvalidRunError

    return (ValueError, TypeError, FileNotFoundError, PermissionError, ModelNotAvailableError,
            RunExistsError, InvalidRunError, MissingProbeError, ExportError)


@app.command()
def models(
    architectures: bool = typer.Option(False, "--architectures",
                                       help="List the tested architectures and any probe each cannot give."),
) -> None:
    """List the embedded models: installed or not, size, layers, d_model, heads, vocab."""
    from .models import list_models

    if architectures:
        from .tiny_models import TINY_PREFIX, architecture_table

        table = Table(title="Architectures (site map from TransformerLens adapters; each tested against Hugging Face)")
        for column in ("architecture", "HF class", "structure", "probes it cannot give"):
            table.add_column(column)
        for row in architecture_table():
            gaps = row["unsupported_probes"]
            table.add_row(row["architecture"], row["class"], row["structure"],
                          "; ".join(f"{p} ({why})" for p, why in gaps.items()) or "none")
        console.print(table)
        console.print(f"Tiny random models of each: load_model('{TINY_PREFIX}<architecture>'). Other architectures "
                      "with a TransformerLens adapter load too; load_model names any probe they cannot give.")
        return

    table = Table(title="Models (any Hugging Face folder works too)")
    table.add_column("name", no_wrap=True)
    for column in ("installed", "MB", "layers", "d_model", "heads", "vocab"):
        table.add_column(column, no_wrap=True)
    table.add_column("about")
    for row in list_models():
        table.add_row(
            row["name"], "yes" if row["installed"] else "no",
            *(str(row.get(k, "?")) for k in ("size_mb", "layers", "d_model", "heads", "vocab")),
            row.get("note", row["description"]),
        )
    console.print(table)


@app.command()
def capture(
    out: Path = typer.Option(..., "--out", help="Run to write: PATH.zarr (recommended) or PATH.nc."),
    model: Optional[str] = typer.Option(None, "--model", help="Embedded name, HF folder; default smollm2-135m."),
    corpus: str = typer.Option("pydoc", "--corpus", help="'pydoc' (bundled) or a .txt/.jsonl file."),
    probes: str = typer.Option(",".join(("resid_pre", "attn_received", "value_norm", "logits")), "--probes",
                               help="Comma-separated probe names (see workbench.PROBES)."),
    backend: str = typer.Option("torch", "--backend", help="torch (default), nnsight or transformer_lens."),
    limit: int = typer.Option(16, "--limit", help="Use at most this many samples of the corpus."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest sample in tokens (default: model context)."),
    truncate: bool = typer.Option(False, "--truncate", help="Cut longer samples instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run at --out."),
) -> None:
    """Capture probes over a corpus and save the run."""
    import workbench as wb

    from .corpus import paragraphs, read_text_file

    try:
        if out.exists() and not overwrite:
            raise wb.RunExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
        texts = paragraphs() if corpus == "pydoc" else read_text_file(corpus)
        texts = texts[:limit]
        handle = wb.load_model(model)
        run = wb.capture(handle, texts, [p.strip() for p in probes.split(",") if p.strip()], backend=backend,
                         batch_size=batch_size, max_tokens=max_tokens, truncate=truncate)
        path = wb.save_run(run, out, overwrite=overwrite)
    except _user_errors() as err:
        _fail(err)
    console.print(f"wrote [bold]{path}[/] ({run.sizes['sample']} samples, {int(run.n_tokens.sum())} tokens, "
                  f"probes {run.attrs['probes']})")


@app.command()
def gallery(
    run: Path = typer.Option(DEMO_RUN, "--run", help="A saved run with the resid_pre probe."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Folder for the figures."),
) -> None:
    """Regenerate the gallery figures (SVG, PDF, PNG) from a saved run."""
    import workbench as wb

    from .gallery import write_residual_norm_gallery

    try:
        if not run.exists():
            raise FileNotFoundError(f"no run at {run}; `workbench demo` writes {DEMO_RUN}.")
        written = write_residual_norm_gallery(wb.open_run(run), out)
        studies = sorted(p.name for p in EXTREME_TOKENS_DIR.glob("*") if (p / "run.zarr").exists())
        if studies:
            written += _write_extreme_token_gallery(studies, out)
        laws = sorted(p.name for p in NEXT_TOKEN_LAW_DIR.glob("*") if (p / "pr.nc").exists())
        if laws:
            written += _write_next_token_law_gallery(laws, out)
        if TOKENIZATION_BIAS_DIR.exists():
            written += _write_tokenization_bias_gallery(out)
        aligned = sorted(p.name for p in TOKEN_ALIGNMENT_DIR.glob("*") if (p / "results.nc").exists())
        if aligned:
            written += _write_token_alignment_gallery(aligned, out)
        if (BYTE_LEVEL_DIR / "ensemble.nc").exists():
            written += _write_byte_level_gallery(out)
    except _user_errors() as err:
        _fail(err)
    written.append(_write_index(out))
    for path in written:
        console.print(f"  {path}")


EXTREME_TOKENS_DIR = Path("runs/extreme_tokens")
NEXT_TOKEN_LAW_DIR = Path("runs/next_token_law")
TOKENIZATION_BIAS_DIR = Path("runs/tokenization_bias")
TOKEN_ALIGNMENT_DIR = Path("runs/token_alignment")
BYTE_LEVEL_DIR = Path("runs/byte_level")


def _write_index(out: Path) -> Path:
    from .gallery import write_gallery_index

    return write_gallery_index(out)


@app.command("extreme-tokens")
def extreme_tokens(
    models: list[str] = typer.Option(["smollm2-135m", "gemma3-270m"], "--model", help="Repeat for several models."),
    layers: Optional[str] = typer.Option(None, "--ablation-layers", help="e.g. '0-5' or '2,7'; default all layers."),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute and replace saved results."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Gallery folder for figures and the table."),
) -> None:
    """Attention sinks, value drains, residual peaks, massive activations, active/dormant heads: per model.

    Results are saved under runs/extreme_tokens/MODEL and reused unless --recompute; the
    figures go to GALLERY/extreme_tokens/MODEL and the table to GALLERY/extreme_tokens.md.
    """
    import workbench as wb

    from .studies import extreme_tokens as study

    try:
        chosen = _parse_layers(layers)
        for name in models:
            folder = EXTREME_TOKENS_DIR / name
            if folder.exists() and not recompute:
                console.print(f"{name}: using saved results in {folder} (--recompute to redo)")
                continue
            study.run_study(wb.load_model(name), folder, ablation_layers=chosen, overwrite=recompute)
        written = _write_extreme_token_gallery(models, out)
    except _user_errors() as err:
        _fail(err)
    _write_index(out)
    console.print(f"{len(written)} figures under {out / 'extreme_tokens'}; table in {out / 'extreme_tokens.md'}")


def _parse_layers(spec: Optional[str]):
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


def _write_extreme_token_gallery(models: list[str], out: Path) -> list[Path]:
    from .studies import extreme_tokens as study
    from .studies.tables import markdown_table

    written, rows = [], []
    for name in models:
        folder = EXTREME_TOKENS_DIR / name
        if not (folder / "run.zarr").exists():
            raise FileNotFoundError(f"no saved extreme-token study for {name}; run `workbench extreme-tokens --model {name}`.")
        written += study.write_figures(folder, out / "extreme_tokens" / name)
        rows.append(study.summary(folder))
    table = markdown_table(rows)
    figures = "\n".join(f"- {name}: " + ", ".join(f"[{p.stem}](extreme_tokens/{name}/{p.name})"
                                                   for p in sorted((out / "extreme_tokens" / name).glob("*.svg")))
                        for name in models)
    (out / "extreme_tokens.md").write_text(
        "# Extreme-token phenomena in the embedded models\n\n"
        "Produced by `workbench extreme-tokens` from the bundled domain samples (prose, code, math, repeated);\n"
        "regenerate the figures from saved results with `workbench gallery`.\n\n"
        f"{table}\n\n## Figures\n\n{figures}\n"
    )
    console.print(table)
    return written


@app.command("next-token-law")
def next_token_law(
    models: list[str] = typer.Option(["smollm2-135m", "gemma3-270m"], "--model", help="Repeat for several models."),
    tokens: int = typer.Option(50_000, "--tokens", help="Corpus tokens for the PR law (20% held out)."),
    probe_tokens: int = typer.Option(30_000, "--probe-tokens", help="Corpus tokens for the future-token probes."),
    lens_tokens: int = typer.Option(4096, "--lens-tokens", help="Tokens whose states train the tuned lens."),
    lens_steps: int = typer.Option(20, "--lens-steps", help="KL steps after the least-squares start."),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute and replace saved results."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Gallery folder for figures and the table."),
) -> None:
    """He & Su's next-token law, future-token probes, logit and tuned lens: per model.

    Results are saved under runs/next_token_law/MODEL (the tuned lens as tuned_lens.nc) and
    reused unless --recompute; figures go to GALLERY/next_token_law, the table to
    GALLERY/next_token_law.md.
    """
    import workbench as wb

    from .studies import next_token_law as study

    try:
        for name in models:
            folder = NEXT_TOKEN_LAW_DIR / name
            if folder.exists() and not recompute:
                console.print(f"{name}: using saved results in {folder} (--recompute to redo)")
                continue
            study.run_study(wb.load_model(name), folder, tokens=tokens, probe_tokens=probe_tokens,
                            lens_tokens=lens_tokens, lens_steps=lens_steps, overwrite=recompute)
        written = _write_next_token_law_gallery(models, out)
    except _user_errors() as err:
        _fail(err)
    _write_index(out)
    console.print(f"{len(written)} figures under {out / 'next_token_law'}; table in {out / 'next_token_law.md'}")


def _write_next_token_law_gallery(models: list[str], out: Path) -> list[Path]:
    from .studies import next_token_law as study
    from .studies.tables import markdown_table

    folders = {name: NEXT_TOKEN_LAW_DIR / name for name in models}
    for name, folder in folders.items():
        if not (folder / "pr.nc").exists():
            raise FileNotFoundError(f"no saved next-token-law study for {name}; run `workbench next-token-law --model {name}`.")
    written = study.write_figures(folders, out / "next_token_law")
    table = markdown_table([study.summary(folder) for folder in folders.values()])
    figures = "\n".join(f"- [{p.parent.name}/{p.stem}](next_token_law/{p.relative_to(out / 'next_token_law')})"
                        for p in sorted((out / "next_token_law").rglob("*.svg")))
    (out / "next_token_law.md").write_text(
        "# Next-token laws across layers in the embedded models\n\n"
        "Produced by `workbench next-token-law` on the bundled pydoc corpus (He & Su's prediction residual PR_l,\n"
        "future-token probes, logit and tuned lens); regenerate the figures from saved results with `workbench gallery`.\n\n"
        f"{table}\n\n## Figures\n\n{figures}\n"
    )
    console.print(table)
    return written


@app.command("tokenization-bias")
def tokenization_bias(
    recompute: bool = typer.Option(False, "--recompute", help="Retrain and replace saved results."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Gallery folder for figures and the table."),
) -> None:
    """Tokenization bias on a known Markov chain (Phan et al., 2024): MPE and BPE toy models, naive vs exact.

    Results (and checkpoints) are saved under runs/tokenization_bias and reused unless
    --recompute; figures and summary.md go to GALLERY/tokenization_bias.
    """
    from .studies import markov_chain as study

    try:
        if TOKENIZATION_BIAS_DIR.exists() and not recompute:
            console.print(f"using saved results in {TOKENIZATION_BIAS_DIR} (--recompute to redo)")
        else:
            study.run_study(TOKENIZATION_BIAS_DIR, overwrite=recompute)
        written = _write_tokenization_bias_gallery(out)
    except _user_errors() as err:
        _fail(err)
    _write_index(out)
    console.print(f"{len(written)} files under {out / 'tokenization_bias'}")


def _write_tokenization_bias_gallery(out: Path) -> list[Path]:
    from .studies import markov_chain as study

    results = study.load_study(TOKENIZATION_BIAS_DIR)
    written = study.write_figures(results, out / "tokenization_bias")
    written.append(study.write_summary(results, out / "tokenization_bias" / "summary.md"))
    console.print(study.summary_table(results))
    return written


@app.command("token-alignment")
def token_alignment(
    models: list[str] = typer.Option(["smollm2-135m"], "--model", help="Repeat for several models."),
    prompts: int = typer.Option(40, "--prompts", help="Random cuts per domain (prose, code)."),
    back_offs: str = typer.Option("1,2", "--back-offs", help="Back-offs compared with plain, e.g. 1,2."),
    seed: int = typer.Option(0, "--seed"),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute and replace saved results."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Gallery folder for figures and the table."),
) -> None:
    """Token alignment (Athiwaratkun et al., 2024): greedy completions of cut prose and code, plain vs aligned.

    Results are saved under runs/token_alignment/MODEL and reused unless --recompute; figures and
    token_alignment.md go to GALLERY/tokenization_bias.
    """
    import workbench as wb

    from .studies import token_alignment as study

    try:
        config = study.StudyConfig(n_prompts=prompts, seed=seed,
                                   back_offs=tuple(int(k) for k in back_offs.split(",") if k.strip()))
        for name in models:
            folder = TOKEN_ALIGNMENT_DIR / name
            if (folder / study.RESULTS_FILE).exists() and not recompute:
                console.print(f"{name}: using saved results in {folder} (--recompute to redo)")
                continue
            study.run_study(wb.load_model(name), folder, config, overwrite=recompute)
        written = _write_token_alignment_gallery(models, out)
    except _user_errors() as err:
        _fail(err)
    _write_index(out)
    console.print(f"{len(written)} files under {out / 'tokenization_bias'}")


def _write_token_alignment_gallery(models: list[str], out: Path) -> list[Path]:
    from .studies import token_alignment as study

    folders = [TOKEN_ALIGNMENT_DIR / name for name in models]
    written = []
    for folder in folders:
        written += study.write_figures(folder, out / "tokenization_bias")
    written.append(study.write_summary(folders, out / "tokenization_bias" / "token_alignment.md"))
    for folder in folders:
        console.print(study.summary_table(folder))
    return written


@app.command("byte-level")
def byte_level(
    recompute: bool = typer.Option(False, "--recompute", help="Recompute and replace saved results."),
    out: Path = typer.Option(GALLERY_DIR, "--out", help="Gallery folder for figures and the table."),
) -> None:
    """Exact byte-level probabilities on real text (Phan et al., 2024): bias along a paragraph, SmolLM2 + Gemma ensemble.

    Results are saved under runs/byte_level and reused unless --recompute; figures and
    byte_level.md go to GALLERY/tokenization_bias.
    """
    from .studies import byte_level as study

    try:
        if (BYTE_LEVEL_DIR / study.ENSEMBLE_FILE).exists() and not recompute:
            console.print(f"using saved results in {BYTE_LEVEL_DIR} (--recompute to redo)")
        else:
            study.run_study(BYTE_LEVEL_DIR, overwrite=True)
        written = _write_byte_level_gallery(out)
    except _user_errors() as err:
        _fail(err)
    _write_index(out)
    console.print(f"{len(written)} files under {out / 'tokenization_bias'}")


def _write_byte_level_gallery(out: Path) -> list[Path]:
    from .studies import byte_level as study

    written = study.write_figures(BYTE_LEVEL_DIR, out / "tokenization_bias")
    written.append(study.write_summary(BYTE_LEVEL_DIR, out / "tokenization_bias" / "byte_level.md"))
    console.print(study.summary(BYTE_LEVEL_DIR))
    return written


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, "--model", help="Default: the embedded smollm2-135m."),
    samples: int = typer.Option(8, "--samples", help="Paragraphs of the bundled corpus to capture."),
    backend: str = typer.Option("torch", "--backend", help="torch (default), nnsight or transformer_lens."),
) -> None:
    """Load the default model, capture the bundled corpus, save the run, write the gallery."""
    import workbench as wb

    from .corpus import paragraphs
    from .gallery import write_residual_norm_gallery

    try:
        handle = wb.load_model(model)
        console.print(f"model: {handle.summary()}")
        texts = paragraphs(min_chars=300, max_chars=700)[:samples]
        run = wb.capture(handle, texts, ["resid_pre", "attn_received", "value_norm", "logits"], backend=backend)
        run.attrs["created_by"] = "workbench demo"
        replace = False
        if DEMO_RUN.exists():
            previous = wb.open_run(DEMO_RUN)  # refuses anything that is not a run
            if previous.attrs.get("created_by") != "workbench demo":
                raise wb.RunExistsError(f"{DEMO_RUN} exists and was not written by the demo; move it away first.")
            console.print(f"replacing {DEMO_RUN} (written by an earlier demo)")
            replace = True
        path = wb.save_run(run, DEMO_RUN, overwrite=replace)
        figures = write_residual_norm_gallery(wb.open_run(path), GALLERY_DIR)
    except _user_errors() as err:
        _fail(err)
    from .analyses import residual_norm_peaks

    peaks = residual_norm_peaks(run)
    mean_nll = float(-run.next_token_logprob.mean())
    console.print(f"\n[bold]run[/]      {path}  ({run.sizes['sample']} samples, {int(run.n_tokens.sum())} tokens)")
    console.print(f"mean next-token loss: {mean_nll:.3f} nats/token")
    typical = peaks.peak_ratio.median("sample")  # per layer
    layer = int(typical.argmax("layer"))
    console.print(
        f"strongest residual peak: layer {layer}, where the largest norm is {float(typical[layer]):.0f}x the median "
        f"token's (median over samples); peak token of sample 0: "
        f"{str(peaks.peak_token.isel(sample=0, layer=layer).values)!r} at position "
        f"{int(peaks.peak_pos.isel(sample=0, layer=layer))}"
    )
    console.print(f"[bold]gallery[/]  {len(figures)} files in {GALLERY_DIR}/")
    console.print(f"[bold]notebooks[/] `workbench lab` opens JupyterLab on {NOTEBOOKS_DIR} (start with 00_quickstart.ipynb)")
    console.print("In Python: run = workbench.open_run('runs/demo.zarr')")


@app.command()
def lab(
    port: int = typer.Option(8888, "--port"),
    browser: bool = typer.Option(False, "--browser/--no-browser", help="Open a browser window."),
) -> None:
    """Start JupyterLab on the notebooks, listening on loopback only."""
    args = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={NOTEBOOKS_DIR}", "--ip=127.0.0.1",
            f"--port={port}", "--ServerApp.open_browser=" + ("True" if browser else "False")]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # containers often run as root; Jupyter refuses without this
    console.print(" ".join(args))
    sys.stdout.flush()
    os.execv(sys.executable, args)  # become JupyterLab: Ctrl-C and signals reach it directly


if __name__ == "__main__":
    app()
