"""Token alignment on real prose and code: greedy completions of randomly cut texts, with and without alignment.

Reproduces the set-up of "Token Alignment via Character Matching for Subword Completion"
(Athiwaratkun et al., Findings of ACL 2024) on one model: cut real texts at random
characters (prose: paragraphs of the bundled pydoc corpus; code: the CPython functions of
``workbench.corpus.domain_samples()["code"]``), complete each prompt greedily as encoded
(``plain``) and with token alignment (``aligned-k``: back off ``k`` tokens, re-spell them under
the character constraint), and score each against the true text
(:func:`workbench.analyses.token_alignment_evaluation.token_alignment_evaluation`).

``run_study(handle, folder)`` saves ``folder/results.nc``; ``summary``, ``write_summary`` and
``write_figures`` work from the saved file alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import xarray as xr

from ..analyses.token_alignment_evaluation import match_rates, token_alignment_evaluation
from ..corpus import domain_samples, paragraphs
from ..plots.export import export_figure
from ..threads import single_thread
from ..models import ModelHandle
from ..plots.token_alignment import match_rate_bars
from ..runs import RunExistsError, open_result, save_result
from .tables import markdown_table

RESULTS_FILE = "results.nc"


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study depends on; the defaults are the committed run (minutes on 2 loaded CPU cores)."""

    n_prompts: int = 40  # per domain
    seed: int = 0
    back_offs: tuple[int, ...] = (1, 2)
    max_new_bytes: int = 24
    max_new_tokens: int = 24
    match_chars: int = 8
    score_bytes: int = 8
    prune: float = 1e-4
    max_nodes: int = 32


def study_texts() -> dict[str, list[str]]:
    """The texts cut into prompts: prose paragraphs of the pydoc corpus and real Python functions."""
    return {"prose": paragraphs(), "code": domain_samples()["code"]}


def run_study(handle: ModelHandle, folder: str | Path, config: StudyConfig = StudyConfig(), *,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Run the evaluation for ``handle`` and save it as ``folder/results.nc``; return the folder.

    Torch runs on one CPU thread meanwhile (one-token forward passes of a small model are
    dominated by per-operation overhead; see :func:`workbench.threads.single_thread`).
    """
    folder = Path(folder)
    path = folder / RESULTS_FILE
    if path.exists() and not overwrite:
        raise RunExistsError(f"{path} already holds a token-alignment study; pass overwrite=True to redo it.")
    started = time.perf_counter()
    with single_thread():
        results = token_alignment_evaluation(
            handle, study_texts(), config.n_prompts, config.seed, back_offs=config.back_offs,
            max_new_bytes=config.max_new_bytes, max_new_tokens=config.max_new_tokens, match_chars=config.match_chars,
            score_bytes=config.score_bytes, prune=config.prune, max_nodes=config.max_nodes, progress=progress,
        )
    results.attrs["config"] = json.dumps(asdict(config))
    results.attrs["texts"] = "prose: workbench.corpus.paragraphs(); code: workbench.corpus.domain_samples()['code']"
    results.attrs["seconds"] = round(time.perf_counter() - started, 1)
    save_result(results, path, overwrite=overwrite)
    return folder


def load_study(folder: str | Path) -> xr.Dataset:
    """The results a :func:`run_study` saved under ``folder``."""
    path = Path(folder) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} holds no token-alignment study ({RESULTS_FILE} missing); run run_study() first.")
    return open_result(path)


def _results(results) -> xr.Dataset:
    return results if isinstance(results, xr.Dataset) else load_study(results)


def _per_decoding(values: xr.DataArray, methods, fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(float(values.sel({"decoding": m}))) for m in methods)


def _rate_cell(table: xr.Dataset, metric: str, domain: str, methods) -> str:
    n = int(table["n"].sel(domain=domain))
    if not n:
        return "no prompts"
    return f"{_per_decoding(table['rate'].sel(metric=metric, domain=domain), methods)} (n={n})"


def summary(results) -> list[dict[str, str]]:
    """Rows for :func:`~workbench.studies.tables.markdown_table`, one per domain; cells read ``plain / aligned-k``."""
    results = _results(results)
    methods = [str(m) for m in results["decoding"].values]
    every = match_rates(results)
    inside = match_rates(results, subset="inside_token")
    boundary = match_rates(results, subset="at_boundary")
    n_chars, n_bytes = results.attrs["match_chars"], results.attrs["score_bytes"]
    rows = []
    for domain in [str(d) for d in every["domain"].values]:
        part = results.isel(prompt=(results["domain"] == domain).values)
        realign = part["tokens_to_realign"]
        rows.append({
            "model": domain,
            "prompts": str(part.sizes["prompt"]),
            "cuts inside a token of the text": f"{float(part['cut_inside_token'].mean()):.0%}",
            "prompts whose encoding differs from the text's (tokens to re-align: 0 / 1 / 2+)": " / ".join(
                str(int(v)) for v in ((realign == 0).sum(), (realign == 1).sum(), (realign >= 2).sum())),
            "next word exact match, all cuts": _rate_cell(every, "word_match", domain, methods),
            f"first {n_chars} characters exact, all cuts": _rate_cell(every, "prefix_match", domain, methods),
            "next word exact match, cuts inside a token": _rate_cell(inside, "word_match", domain, methods),
            "next word exact match, cuts at a token boundary": _rate_cell(boundary, "word_match", domain, methods),
            f"mean log P(next {n_bytes} bytes), nats": _per_decoding(
                part["continuation_logprob"].mean("prompt"), methods),
            f"median log P(next {n_bytes} bytes), nats": _per_decoding(
                part["continuation_logprob"].median("prompt"), methods),
            "scores whose pruned token sequences could hold more than 1e-3 probability": _per_decoding(
                (part["pruned_mass"] > 1e-3).sum("prompt"), methods, "{:.0f}"),
            "model calls to generate (mean)": _per_decoding(part["generation_calls"].mean("prompt"), methods, "{:.1f}"),
            "constrained steps (mean)": _per_decoding(part["constrained_steps"].mean("prompt"), methods),
            "model positions to generate (mean)": _per_decoding(
                part["generation_positions"].mean("prompt"), methods, "{:.0f}"),
            "model calls to score the next bytes (mean)": _per_decoding(
                part["scoring_calls"].mean("prompt"), methods, "{:.1f}"),
            "seconds per prompt, all methods (mean)": f"{float(part['seconds'].mean()):.2f}",
        })
    return rows


def summary_table(results) -> str:
    """The study's numbers as a markdown table (one column per domain) under a line describing the set-up."""
    results = _results(results)
    methods = " / ".join(str(m) for m in results["decoding"].values)
    setup = (
        f"{results.attrs['model']}, greedy decoding, {results.attrs['n_prompts_per_domain']} random cuts per domain "
        f"(seed {results.attrs['seed']}); completions of up to {results.attrs['max_new_bytes']} bytes. "
        f"Cells read {methods}; intervals in the figure are 95% Wilson intervals."
    )
    return setup + "\n\n" + markdown_table(summary(results)) + "\n"


def write_summary(results, path: str | Path) -> Path:
    """Write :func:`summary_table`, the figure and a few example completions to ``path`` (markdown).

    ``results``: one study (a folder or its Dataset) or a list of them (one section per model).
    The figure is linked as ``token_alignment_<model>.png`` beside ``path`` (see :func:`write_figures`).
    """
    studies = [_results(r) for r in (results if isinstance(results, (list, tuple)) else [results])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    for one in studies:
        model = one.attrs["model"]
        figure = f"![Match rates, {model}](token_alignment_{model}.png)"
        sections.append(f"## {model}\n\n" + summary_table(one) + f"\n{figure}\n\n" + _examples(one))
    path.write_text(
        "# Token alignment on prose and code\n\n"
        '"Token Alignment via Character Matching for Subword Completion" (Athiwaratkun et al., 2024): back off the '
        "prompt's last token(s) and constrain the first generated tokens to re-spell them. Texts are cut at random "
        "characters; `plain` completes the encoded prompt, `aligned-k` backs off k tokens. Produced by "
        "`workbench.studies.token_alignment` (results under `runs/token_alignment/<model>`).\n\n"
        + "\n".join(sections)
    )
    return path


def _examples(results: xr.Dataset, n: int = 4) -> str:
    """A few cuts inside a token where the methods disagree, as a markdown table."""
    inside = results.isel(prompt=results["cut_inside_token"].values.astype(bool))
    methods = [str(m) for m in results["decoding"].values]
    lines = ["| prompt ends | true text | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]

    def cell(s: str) -> str:
        return "`" + s.replace("\n", "⏎").replace("|", "\\|").replace("`", "'") + "`"

    shown = 0
    for i in range(inside.sizes["prompt"]):
        one = inside.isel(prompt=i)
        completions = [str(one["completion"].sel({"decoding": m}).values) for m in methods]
        if len(set(completions)) == 1:
            continue
        ends, truth = str(one["prompt_text"].values)[-30:], str(one["continuation_text"].values)[:20]
        lines.append(f"| {cell(ends)} | {cell(truth)} | " + " | ".join(cell(c[:20]) for c in completions) + " |")
        shown += 1
        if shown == n:
            break
    return "Examples (cuts inside a token, first 20 characters):\n\n" + "\n".join(lines) + "\n" if shown else ""


def write_figures(results, out_dir: str | Path, formats=("svg", "png")) -> list[Path]:
    """``out_dir/token_alignment_<model>.<fmt>``: match-rate bars, all cuts and cuts inside a token."""
    results = _results(results)
    rates = xr.concat([match_rates(results), match_rates(results, subset="inside_token")], dim="subset")
    rates = rates.assign_coords(subset=["all", "inside_token"])
    rates.attrs = match_rates(results).attrs
    fig = match_rate_bars(rates)
    return export_figure(fig, Path(out_dir) / f"token_alignment_{results.attrs['model']}", formats=formats,
                         columns="two", height=380)
