"""The next-token-law study of one model: PR law, future-token probes, logit and tuned lens, saved.

``run_study(model, folder)`` computes everything on the bundled pydoc corpus and saves it
under ``folder`` (written to ``folder.partial``, renamed when complete); ``summary`` and
``write_figures`` work from the saved files alone, so the table and the gallery
regenerate without the model.

Data use: the law and the probes take the first ``tokens`` tokens of the corpus in
512-token windows, 20% of the windows held out. The tuned lens trains on windows of the
documents that do not contain the lens prompts (the last paragraphs of the corpus), so
the lens figures are held out from its training.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses.lens import lens_statistics, lens_summary
from ..analyses.linear_readout import UnstableFitWarning
from ..analyses.next_token_law import future_token_probes, law_fit, prediction_residuals
from ..capturing import capture
from ..corpus import load_corpus, paragraphs
from ..plots.export import export_figure
from ..models import ModelHandle
from ..plots.next_token_law import (
    contribution_figure,
    future_token_figure,
    law_figure,
    lens_comparison_figure,
    lens_heatmap,
)
from ..probes.lens import TunedLens, train_tuned_lens
from ..probes.streaming import token_windows
from ..runs import open_result, open_run, save_result, save_run
from .staging import staged_folder

LAW_TARGETS = ("token_id", "shuffled_id", "one_hot")
RESULTS = ("pr", "future", "tuned_lens", "lens_logit", "lens_tuned")


def lens_prompts(n: int = 6, max_chars: int = 400) -> list[str]:
    """The last ``n`` paragraphs of the bundled corpus (held out from tuned-lens training)."""
    return paragraphs(max_chars=max_chars)[-n:]


def _lens_training_texts(prompts: list[str]) -> list[str]:
    keys = [p[:60] for p in prompts]
    texts = []
    for doc in load_corpus():
        flat = " ".join(doc["text"].split())
        if not any(k in flat for k in keys):
            texts.append(doc["text"])
    return texts


def run_study(
    model: ModelHandle,
    folder: str | Path,
    *,
    tokens: int = 50_000,
    probe_tokens: int = 30_000,
    lens_tokens: int = 4096,
    lens_steps: int = 20,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compute the law, the future-token probes and both lenses for ``model``; save them under ``folder``."""
    options = {"tokens": tokens, "probe_tokens": probe_tokens, "lens_tokens": lens_tokens, "lens_steps": lens_steps}
    with staged_folder(folder, overwrite, options=options) as work:
        texts = [doc["text"] for doc in load_corpus()]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnstableFitWarning)  # the study must not report an unstable fit
            pr = prediction_residuals(model, texts, targets=LAW_TARGETS, max_tokens=tokens, progress=progress)
            save_result(pr, work / "pr.nc")
            future = future_token_probes(model, texts, max_tokens=probe_tokens, progress=progress)
            save_result(future, work / "future.nc")
        prompts = lens_prompts()
        windows = token_windows(model, _lens_training_texts(prompts), max_tokens=4 * lens_tokens)
        lens = train_tuned_lens(model, windows, max_tokens=lens_tokens, steps=lens_steps, progress=progress)
        save_result(lens.to_dataset(), work / "tuned_lens.nc")
        run = capture(model, prompts, ["resid_post"], max_tokens=96, truncate=True, progress=progress)
        save_run(run, work / "lens_run.zarr")
        save_result(lens_statistics(run, model), work / "lens_logit.nc")
        save_result(lens_statistics(run, model, lens), work / "lens_tuned.nc")
        save_vocabulary(model, work)
    return Path(folder)


def load_study(folder: str | Path) -> dict[str, xr.Dataset]:
    folder = Path(folder)
    if not (folder / "pr.nc").exists():
        raise FileNotFoundError(f"no next-token-law study in {folder}; run `workbench next-token-law`.")
    study = {name: open_result(folder / f"{name}.nc") for name in RESULTS if (folder / f"{name}.nc").exists()}
    if (folder / "lens_run.zarr").exists():
        study["lens_run"] = open_run(folder / "lens_run.zarr")
    return study


def load_tuned_lens(folder: str | Path) -> TunedLens:
    return TunedLens.from_dataset(open_result(Path(folder) / "tuned_lens.nc"))


def summary(folder: str | Path) -> dict:
    """One row of the next-token-law table, from saved results."""
    study = load_study(folder)
    pr = study["pr"]
    fit = law_fit(pr.pr)
    main = fit.sel(target="token_id")
    row = {
        "model": pr.attrs["model"],
        "layers": int(pr.sizes["layer"]),
        "tokens (fit / held out)": f"{int(pr.n_tokens.sel(split='train'))} / {int(pr.n_tokens.sel(split='test'))}",
        "Pearson r (log10 PR vs layer)": f"{float(main.pearson_r.sel(split='train')):.3f}",
        "rho (PR decay per layer)": f"{float(main.rho.sel(split='train')):.4f}",
        "PR_1": f"{float(main.pr_first.sel(split='train')):.3f}",
        "PR_L": f"{float(main.pr_last.sel(split='train')):.3f}",
        "PR_L / PR_1": f"{float(main.pr_ratio.sel(split='train')):.3f}",
        "held out: r, rho": f"{float(main.pearson_r.sel(split='test')):.3f}, {float(main.rho.sel(split='test')):.4f}",
        "shuffled ids: r, rho": ", ".join(f"{float(fit.sel(target='shuffled_id', split='train')[v]):.3f}"
                                          for v in ("pearson_r", "rho")),
        "one-hot targets: r, rho": ", ".join(f"{float(fit.sel(target='one_hot', split='train')[v]):.3f}"
                                             for v in ("pearson_r", "rho")),
        "solver": pr.attrs["solver"],
    }
    if "future" in study:
        acc = study["future"].accuracy
        row["future-token probe accuracy, last layer, k=1..4"] = " / ".join(
            f"{float(v):.2f}" for v in acc.isel(layer=-1).values)
        row["future-token probe accuracy, best layer for k=2"] = (
            f"{float(acc.sel(k=2).max()):.2f} (layer {int(acc.sel(k=2).values.argmax())})" if 2 in acc.k else "")
    if "tuned_lens" in study:
        info = study["tuned_lens"].attrs
        row["tuned lens: tokens, KL steps"] = f"{info['tokens_train']}, {info['steps']} x {info['batch_tokens']}"
        row["held-out mean KL to final: logit lens / LS init / tuned"] = " / ".join(
            f"{info[k]:.2f}" for k in ("heldout_mean_kl_logit_lens", "heldout_mean_kl_init", "heldout_mean_kl_trained"))
    if "lens_logit" in study and "lens_tuned" in study:
        for name in ("logit", "tuned"):
            agree = lens_summary(study[f"lens_{name}"]).top1_agreement
            first = int(np.argmax(agree.values >= 0.5))
            row[f"{name} lens: first layer agreeing with the output on >= 50% of tokens"] = str(first)
    return row


def save_vocabulary(model: ModelHandle, folder: str | Path) -> Path:
    """Each token id decoded on its own, as JSON, so lens figures label tokens without the model."""
    tokenizer = model.tokenizer
    words = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    path = Path(folder) / "vocabulary.json"
    path.write_text(json.dumps(words, ensure_ascii=False))
    return path


def _vocabulary(folder: Path):
    path = folder / "vocabulary.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_figures(folders: dict[str, Path], out_dir: str | Path, formats=("svg", "png")) -> list[Path]:
    """The law across models, and per model: contributions, lens heatmaps, logit vs tuned lens, probe grid."""
    out_dir = Path(out_dir)
    studies = {name: load_study(folder) for name, folder in folders.items()}
    selected = {name: s["pr"].pr.sel(target="token_id", split="train") for name, s in studies.items()}
    figures = {"law": (law_figure({n: (pr, law_fit(pr)) for n, pr in selected.items()}), "two")}
    for name, study in studies.items():
        decode = _vocabulary(Path(folders[name]))
        figures[f"{name}/contributions"] = (contribution_figure(law_fit(selected[name])), "one")
        if "future" in study:
            figures[f"{name}/future_token_probes"] = (future_token_figure(study["future"]), "one")
        for lens in ("logit", "tuned"):
            if f"lens_{lens}" in study:
                figures[f"{name}/{lens}_lens_cross_entropy"] = (
                    lens_heatmap(study[f"lens_{lens}"], 0, "cross_entropy", decode=decode), "two")
        if "lens_logit" in study and "lens_tuned" in study:
            figures[f"{name}/logit_vs_tuned_lens"] = (
                lens_comparison_figure(lens_summary(study["lens_logit"]), lens_summary(study["lens_tuned"])), "two")
    written = []
    for stem, (fig, columns) in figures.items():
        written += export_figure(fig, out_dir / stem, formats=formats, columns=columns,
                                 height=420 if "lens_cross_entropy" in stem else None)
    return written
