"""The ``workbench`` command: demo, capture, gallery, lab, models."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


class _HelpSwitch:
    """--help shown as the switch it is (typer prints a value type, <bool>, for it)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_HelpSwitch, typer.core.TyperCommand):
    pass


class _Group(_HelpSwitch, typer.core.TyperGroup):
    command_class = _Command


def switch(name: str, help: str, default: bool = False):
    """A boolean option as a pair of switches, ``--name/--no-name``, shown without a value."""
    return typer.Option(default, f"--{name}/--no-{name}", help=help, metavar="")


def _version(show: bool) -> None:
    if show:
        from . import version

        console.print(f"workbench {version()}")
        raise typer.Exit()


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_Group)
console = Console()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                            help="Print the version and exit.")) -> None:
    """Look inside language models: capture, explore, export."""

DEMO_RUN = Path("runs/demo.zarr")
GALLERY_DIR = Path("gallery")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=1)


def _user_errors():
    from .analyses import MissingProbeError
    from .plots.export import ExportError
    from .models import ModelNotAvailableError
    from .runs import RunExistsError
    from .schema import InvalidRunError

    return (ValueError, TypeError, FileNotFoundError, PermissionError, ModelNotAvailableError,
            RunExistsError, InvalidRunError, MissingProbeError, ExportError)


@app.command(cls=_Command)
def models(
    architectures: bool = switch("architectures", "List the tested architectures and any probe each cannot give."),
) -> None:
    """List the embedded models: installed or not, size, layers, d_model, heads, vocab."""
    from .models import list_models

    if architectures:
        from .models.tiny import TINY_PREFIX, architecture_table

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

    rows = list_models()
    table = Table(title="Models (any Hugging Face folder works too)")
    table.add_column("name", no_wrap=True)
    for column in ("installed", "MB", "layers", "d_model", "heads", "vocab"):
        table.add_column(column, no_wrap=True, justify="left" if column == "installed" else "right")
    for row in rows:
        table.add_row(row["name"], "yes" if row["installed"] else "no",
                      *(str(row.get(k, "?")) for k in ("size_mb", "layers", "d_model", "heads", "vocab")))
    console.print(table)  # about 75 columns: the descriptions follow as text, so an 80-column terminal fits
    for row in rows:
        console.print(f"[bold]{row['name']}[/]: {row.get('note', row['description'])}")


@app.command(cls=_Command)
def capture(
    out: Path = typer.Option(..., "--out", metavar="PATH", help="Run to write: PATH.zarr, streamed batch by "
                             "batch (rerun the command to resume), or PATH.nc (in memory, then saved)."),
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME", help="Embedded name, HF folder; default "
                                        "smollm2-135m."),
    corpus: str = typer.Option("pydoc", "--corpus", metavar="NAME|FILE",
                               help="'pydoc' (bundled) or a .txt/.jsonl file."),
    probes: str = typer.Option(",".join(("resid_pre", "attn_received", "value_norm", "logits")), "--probes",
                               metavar="A,B,...", help="Comma-separated probe names (see workbench.PROBES)."),
    backend: str = typer.Option("torch", "--backend", metavar="NAME", help="torch, nnsight or transformer_lens."),
    limit: Optional[int] = typer.Option(16, "--limit", metavar="N",
                                        help="Use at most this many samples of the corpus (0: all)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", help="Samples per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", metavar="N",
                                             help="Longest sample in tokens (default: model context)."),
    truncate: bool = switch("truncate", "Cut longer samples instead of failing."),
    residual_dtype: str = typer.Option("float32", "--residual-dtype", metavar="DTYPE",
                                       help="float32 or float16 (half the disk) for residuals and updates."),
    overwrite: bool = switch("overwrite", "Replace an existing run at --out."),
) -> None:
    """Capture probes over a corpus and save the run; into a .zarr store it streams (memory bounded by
    one batch) and, interrupted (Ctrl-C, SIGKILL, power cut), the same command continues where it stopped.

    Writes only --out. The default 16 pydoc samples take about half a minute on the embedded model
    (2 CPU threads); `workbench plan` estimates any other size first.
    """
    import workbench as wb

    from .capture_store import check_store_path
    from .corpus import paragraphs, read_text_file
    from .locks import WriterBusyError, exclusive
    from .probes import check_backend, resolve_probes
    from .runs import check_replaceable

    try:  # every input is checked before the model loads
        streamed = out.suffix != ".nc"  # .nc: captured in memory, then saved
        out = check_store_path(out) if streamed else out.expanduser()
        if limit is not None and limit < 0:
            raise ValueError(f"--limit must be 0 (all samples) or more, got {limit}.")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}.")
        if model is not None and not model.strip():
            raise ValueError("--model is empty; leave it out for the default (smollm2-135m).")
        probe_names = [p.strip() for p in probes.split(",") if p.strip()]
        resolve_probes(probe_names)
        check_backend(backend)
        texts = paragraphs() if corpus == "pydoc" else read_text_file(corpus)
        texts = texts[:limit] if limit else texts
        with exclusive(out):  # a second writer is refused here, before the model loads
            if out.exists() and not overwrite:
                raise wb.RunExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
            check_replaceable(out, overwrite)
            handle = wb.load_model(model)
            run = wb.capture(handle, texts, probe_names, backend=backend, batch_size=batch_size,
                             max_tokens=max_tokens, truncate=truncate, residual_dtype=residual_dtype,
                             out=out if streamed else None, overwrite=overwrite)
            if not streamed:
                wb.save_run(run, out, overwrite=overwrite)
    except (*_user_errors(), WriterBusyError) as err:
        _fail(err)
    console.print(f"wrote [bold]{out}[/] ({run.sizes['sample']} samples, {int(run.n_tokens.sum())} tokens, "
                  f"probes {run.attrs['probes']})")


@app.command(cls=_Command)
def plan(
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME", help="Embedded name, HF folder; default "
                                        "smollm2-135m."),
    corpus: str = typer.Option("pydoc", "--corpus", metavar="NAME|FILE",
                               help="'pydoc' (bundled) or a .txt/.jsonl file."),
    probes: str = typer.Option(",".join(("resid_pre", "attn_received", "value_norm", "logits")), "--probes",
                               metavar="A,B,...", help="Comma-separated probe names (see workbench.PROBES)."),
    limit: Optional[int] = typer.Option(0, "--limit", metavar="N",
                                        help="Use at most this many samples of the corpus (0: all)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", help="Samples per forward pass."),
    residual_dtype: str = typer.Option("float32", "--residual-dtype", metavar="DTYPE", help="float32 or float16."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="PATH",
                                       help="Where the run would be streamed (checks that disk)."),
    truncate: bool = switch("truncate", "Cut samples longer than the model's context."),
) -> None:
    """Before capturing: bytes on disk, peak memory and time of `workbench capture` with the same options
    (one batch is timed), and whether it fits. Writes nothing; takes seconds (the model loads, one batch
    runs)."""
    import workbench as wb

    from .capture_plan import estimate_capture
    from .corpus import paragraphs, read_text_file
    from .probes import resolve_probes

    try:
        if limit is not None and limit < 0:
            raise ValueError(f"--limit must be 0 (all samples) or more, got {limit}.")
        probe_names = [p.strip() for p in probes.split(",") if p.strip()]
        resolve_probes(probe_names)
        texts = paragraphs() if corpus == "pydoc" else read_text_file(corpus)
        texts = texts[:limit] if limit else texts
        handle = wb.load_model(model)
        estimate = estimate_capture(handle, texts, probe_names, batch_size=batch_size, residual_dtype=residual_dtype,
                                    out=out, truncate=truncate)
    except _user_errors() as err:
        _fail(err)
    console.print(estimate.report(), markup=False, highlight=False)


@app.command(cls=_Command)
def gallery(
    run: Path = typer.Option(DEMO_RUN, "--run", metavar="PATH", help="A saved run with the resid_pre probe."),
    out: Path = typer.Option(GALLERY_DIR, "--out", metavar="FOLDER", help="Folder for the figures."),
) -> None:
    """Regenerate every figure (SVG, PDF, PNG), page and table from saved runs (seconds to a few minutes).

    Residual norms from --run; each study's figures and page from its saved results under runs/;
    then the gallery index (GALLERY/README.md) and the README's study tables.
    """
    import workbench as wb

    from .gallery import write_residual_norm_gallery
    from .studies.registry import STUDIES

    try:
        if not run.exists():
            raise FileNotFoundError(f"no run at {run}; `workbench demo` writes {DEMO_RUN}.")
        written = write_residual_norm_gallery(wb.open_run(run), out)
        for study in STUDIES.values():
            saved = study.saved_models()
            if saved:
                files, table = study.write_gallery(saved if study.per_model else None, out)
                written += files
    except _user_errors() as err:
        _fail(err)
    written += _write_index(out)
    for path in written:
        console.print(f"  {path}")


def _write_index(out: Path) -> list[Path]:
    """The gallery index and, when writing the repository's own gallery, the README's study tables."""
    from .gallery import write_gallery_index
    from .studies.registry import sync_readme_tables

    written = [write_gallery_index(out)]
    readme = Path("README.md")
    if out.resolve() == GALLERY_DIR.resolve() and readme.exists() and sync_readme_tables(readme, out):
        written.append(readme)
    return written


def _study_command(study):
    """A ``workbench <study>`` command made from its registry entry: its options, --recompute, --out."""
    import inspect

    def command(**kwargs) -> None:
        recompute, out = kwargs.pop("recompute"), kwargs.pop("out")
        models = kwargs.pop("models", None)
        try:
            study.run_missing(models, kwargs, recompute, say=console.print)
            written, table = study.write_gallery(models, out)
        except _user_errors() as err:
            _fail(err)
        _write_index(out)
        console.print(table)
        console.print(f"{len(written)} files written; page {out / study.page}")

    params = []
    if study.per_model:
        params.append(inspect.Parameter("models", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                                        default=typer.Option(list(study.default_models), "--model", metavar="NAME",
                                                             help="Repeat for several models.")))
    for option in study.options:
        metavar = {int: "N", float: "X"}.get(option.type, "TEXT")
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=option.type,
                                        default=typer.Option(option.default, option.flag, help=option.help,
                                                             metavar=metavar)))
    params += [
        inspect.Parameter("recompute", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=switch("recompute", "Recompute and replace saved results (else only the "
                                         "missing ones are computed).")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(GALLERY_DIR, "--out", metavar="FOLDER",
                                               help="Gallery folder for figures and the table.")),
    ]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = study.help
    command.__name__ = study.name.replace("-", "_")
    return command


def _register_studies() -> None:
    from .studies.registry import STUDIES

    for study in STUDIES.values():
        app.command(study.name, cls=_Command)(_study_command(study))


_register_studies()


@app.command(cls=_Command)
def demo(
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME", help="Default: the embedded smollm2-135m."),
    samples: int = typer.Option(8, "--samples", metavar="N", help="Paragraphs of the bundled corpus to capture."),
    backend: str = typer.Option("torch", "--backend", metavar="NAME", help="torch, nnsight or transformer_lens."),
) -> None:
    """Load the default model, capture the bundled corpus, save the run, write the gallery.

    Writes runs/demo.zarr and the residual-norm figures in gallery/; under a minute once the model is
    converted (the first load converts the GGUF once, about half a minute more).
    """
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


@app.command(cls=_Command)
def lab(
    port: int = typer.Option(8888, "--port", metavar="N", help="Port on 127.0.0.1."),
    browser: bool = switch("browser", "Open a browser window."),
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
