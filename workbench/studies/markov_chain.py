"""The Markov-chain validation of tokenization bias: train, estimate, save; then figures and a table from the saved file.

Reproduces the experiment of "Understanding and Mitigating Tokenization Bias in Language
Models" (Phan, Havasi, Muckley & Ullrich, 2024) at CPU scale: sample a corpus from a known
3rd-order chain over "A"/"B", tokenise it with maximum-prefix encoding and with a trained
BPE, train a small Llama on each, and at several training steps read
``P(next char | context)`` naively (prompting with the encoded context) and exactly
(summing cover encodings), against the true transitions.

``run_study(folder)`` does everything and saves ``folder/results.nc`` (the checkpoint
sweep of :func:`workbench.analyses.tokenization_bias.checkpoint_sweep` plus the training
loss per checkpoint, the set-up in attrs) and every checkpoint as a Hugging Face folder
under ``folder/checkpoints/<tokenizer>/step-<n>``. ``write_figures`` and
``summary_table`` work from the saved results alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses.tokenization_bias import checkpoint_sweep
from ..plots.export import export_figure
from ..models.markov_chain import (
    ALPHABET,
    MPE_TOKENS,
    MarkovChain,
    TrainingConfig,
    bpe_tokenizer,
    mpe_tokenizer,
    single_thread,
    tokenizer_tokens,
    train_toy_model,
)
from ..plots.tokenization_bias import error_vs_steps, transition_heatmaps
from ..runs import open_result, save_result
from .staging import staged_folder
from .tables import markdown_table

RESULTS_FILE = "results.nc"


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study depends on; the defaults are the committed experiment (a few minutes on 2 CPU cores)."""

    alphabet: tuple[str, ...] = ALPHABET
    order: int = 3
    chain_seed: int = 0
    n_sequences: int = 20000
    length: int = 48
    corpus_seed: int = 1
    mpe_tokens: tuple[str, ...] = MPE_TOKENS
    bpe_merges: int = 6
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(steps=800, batch_size=128, checkpoint_steps=(25, 50, 100, 200, 400, 800))
    )


def run_study(
    folder: str | Path, config: StudyConfig = StudyConfig(), *, overwrite: bool = False, progress: bool = True
) -> Path:
    """Train one model per tokenizer, sweep its checkpoints, save everything under ``folder``; return the folder.

    Written to ``folder.partial`` first and renamed when complete, so an interrupted study
    never passes for a finished one.
    """
    with staged_folder(folder, overwrite) as work:
        started = time.perf_counter()
        chain = MarkovChain.random(config.alphabet, config.order, seed=config.chain_seed)
        corpus = chain.sample(config.n_sequences, config.length, seed=config.corpus_seed)
        tokenizers = {"mpe": mpe_tokenizer(config.mpe_tokens), "bpe": bpe_tokenizer(corpus, config.bpe_merges, config.alphabet)}
        checkpoints = {}
        for name, tokenizer in tokenizers.items():
            checkpoints[name] = train_toy_model(tokenizer, corpus, config.training, name=f"markov-{name}",
                                                save_dir=work / "checkpoints" / name, progress=progress)
        with single_thread():
            results = checkpoint_sweep(checkpoints, chain, progress=progress)
        steps = [int(s) for s in results["step"].values]
        loss = [[checkpoints[t][s].hf_model.config.workbench_training["smoothed_loss"] for s in steps] for t in tokenizers]
        results["training_loss"] = (("tokenizer", "step"), np.array(loss))
        results["training_loss"].attrs["description"] = "training cross-entropy (nats/token), exponential moving average"
        any_handle = next(iter(checkpoints["mpe"].values()))
        results.attrs = {
            "paper": "Understanding and Mitigating Tokenization Bias in Language Models (Phan et al., 2024)",
            "config": json.dumps(asdict(config)),
            "tokens": json.dumps({name: tokenizer_tokens(tok) for name, tok in tokenizers.items()}),
            "model": json.dumps({k: v for k, v in any_handle.summary().items() if k != "name" and k != "vocab"}),
            "corpus_characters": config.n_sequences * config.length,
            "seconds": round(time.perf_counter() - started, 1),
        }
        save_result(results, work / RESULTS_FILE)
    return Path(folder)


def load_study(folder: str | Path) -> xr.Dataset:
    """The results a :func:`run_study` saved under ``folder``."""
    path = Path(folder) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no Markov-chain study ({RESULTS_FILE} missing); run run_study() first.")
    return open_result(path)


def _results(results) -> xr.Dataset:
    return results if isinstance(results, xr.Dataset) else load_study(results)


def summary_rows(results) -> dict[str, dict[str, str]]:
    """Per tokenizer: its tokens, final-step errors of each estimate, the errors at each step, the training loss."""
    results = _results(results)
    last = int(results["step"].max())
    tokens = json.loads(results.attrs["tokens"])

    def pair(values, a="exact", b="naive") -> str:
        return f"{float(values.sel(estimate=a)):.3f} / {float(values.sel(estimate=b)):.3f}"

    def by_step(errors, estimate) -> str:
        values = errors.mean_abs_error.sel(estimate=estimate).values
        return ", ".join(f"{int(s)}: {float(v):.3f}" for s, v in zip(errors.step.values, values))

    rows = {}
    for tokenizer in [str(t) for t in results["tokenizer"].values]:
        errors = results.sel(tokenizer=tokenizer)
        final = errors.sel(step=last)
        limit = final.probability.sel(estimate="naive_limit").isnull().any("next_char")
        unseen = [str(c) for c in limit["context"].values[limit.values]]
        rows[tokenizer] = {
            "tokens": " ".join(tokens[tokenizer]),
            f"max abs error, exact / naive (step {last})": pair(final.max_abs_error),
            f"mean abs error, exact / naive (step {last})": pair(final.mean_abs_error),
            "max / mean abs error of naive prompting on a perfect model (predicted)": (
                f"{float(final.max_abs_error.sel(estimate='naive_limit')):.3f} / "
                f"{float(final.mean_abs_error.sel(estimate='naive_limit')):.3f}"),
            "prompts whose encoding starts no longer text (left out of the prediction)": ", ".join(unseen) or "none",
            "mean abs error by step, exact": by_step(errors, "exact"),
            "mean abs error by step, naive": by_step(errors, "naive"),
            f"training loss, nats/token (step {last})": f"{float(final.training_loss):.4f}",
        }
    return rows


def summary_table(results) -> str:
    """The study's numbers as a markdown table (one column per tokenizer) under a line describing the set-up."""
    results = _results(results)
    config = json.loads(results.attrs["config"])
    model = json.loads(results.attrs["model"])
    rows = summary_rows(results)
    setup = (
        f"Order-{config['order']} Markov chain over {'/'.join(config['alphabet'])} (seed {config['chain_seed']}), "
        f"{config['n_sequences']} sequences of {config['length']} characters; "
        f"{model['layers']}-layer Llama (d_model {model['d_model']}, {model['heads']} heads, {model['params']} parameters), "
        f"{config['training']['steps']} steps of batch {config['training']['batch_size']}. "
        "Errors are |P_est(c | context) - P_true(c | context)| over all contexts and characters."
    )
    return setup + "\n\n" + markdown_table([{"model": name, **row} for name, row in rows.items()]) + "\n"


def write_summary(results, path: str | Path) -> Path:
    """Write :func:`summary_table` to ``path`` (markdown)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Tokenization bias on a Markov chain\n\n" + summary_table(results))
    return path


def write_figures(results, gallery_dir: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
    """The transition heatmaps (last step) and the error-vs-steps curves, into ``gallery_dir``."""
    results = _results(results)
    gallery_dir = Path(gallery_dir)
    last = int(results["step"].max())
    figures = {
        "transition_heatmaps": (transition_heatmaps(
            results["probability"].sel(step=last), title=f"P(next character | context), step {last}"), "two", 330),
        "error_vs_steps": (error_vs_steps(results), "two", None),
    }
    written = []
    for name, (fig, columns, height) in figures.items():
        written += export_figure(fig, gallery_dir / name, formats=formats, columns=columns, height=height)
    return written
