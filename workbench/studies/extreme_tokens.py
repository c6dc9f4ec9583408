"""The extreme-token study of one model: capture, analyses, interventions, saved results, figures, table.

``run_study(model, folder)`` computes everything and saves it under ``folder``
(``run.zarr`` plus one ``.nc`` per intervention); ``write_figures(folder, out)`` and
``summary(folder)`` work from the saved files alone, so the gallery and the README
table regenerate without the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses import extreme_tokens as et
from ..analyses.residual_norms import residual_norms
from ..capturing import capture
from ..corpus import domain_samples, load_corpus
from ..plots.export import export_figure
from ..models import ModelHandle
from ..plots import (
    condition_bars,
    head_state_map,
    massive_activation_map,
    massive_activation_profile,
    residual_norm_heatmap,
    scaling_curves,
    sink_score_by_domain,
    value_norm_vs_attention,
)
from ..runs import open_result, open_run, save_result, save_run
from .staging import staged_folder

PROBES = ["resid_pre", "attn_received", "value_norm"]
RESULTS = ("head_effects", "scaling", "streaming", "massive_intervention")


def capture_domains(model: ModelHandle, probes=PROBES, progress: bool = True) -> xr.Dataset:
    """A run over the bundled domain samples with a ``domain`` coordinate on ``sample``."""
    samples = domain_samples()
    texts = [t for d in samples for t in samples[d]]
    domains = [d for d in samples for _ in samples[d]]
    return capture(model, texts, probes, progress=progress).assign_coords(domain=("sample", domains))


def _massive_source(run: xr.Dataset) -> tuple[int, list[int]]:
    """The dimensions massive in every sample, and the layer whose output first carries them."""
    entries = et.massive_activations(run)
    if entries.sizes["entry"] == 0:
        return -1, []
    dims = et.massive_dimensions(entries, run.sizes["sample"])
    always = [int(d) for d in dims["dim"].values[dims["sample_fraction"].values == 1.0]][:2]
    first_resid_layer = int(entries["layer"].values[np.isin(entries["dim"].values, always)].min())
    return max(first_resid_layer - 1, 0), always


def run_study(
    model: ModelHandle, folder: str | Path, *, ablation_layers=None, overwrite: bool = False, progress: bool = True
) -> Path:
    """Capture the domain samples and run every intervention; save all of it under ``folder``.

    Everything is written to ``folder.partial`` first and renamed when complete, so an
    interrupted study never passes for a finished one.
    """
    layers = None if ablation_layers is None else [int(layer) for layer in ablation_layers]
    with staged_folder(folder, overwrite, options={"ablation_layers": layers}) as work:
        run = capture_domains(model, progress=progress)
        save_run(run, work / "run.zarr")
        samples = domain_samples()
        effects = et.head_ablation_effects(model, {d: t[:2] for d, t in samples.items()}, layers=ablation_layers,
                                           progress=progress)
        save_result(effects, work / "head_effects.nc")
        scaling = et.first_token_attention_scaling(model, samples["prose"] + samples["code"])
        save_result(scaling, work / "scaling.nc")
        long_text = max((d["text"] for d in load_corpus()), key=len)
        streaming = et.streaming_perplexity(model, long_text, window=64, n_sink=4, max_tokens=512)
        save_result(streaming, work / "streaming.nc")
        layer, dims = _massive_source(run)
        if dims:
            massive = et.massive_activation_intervention(model, samples["prose"] + samples["code"], layer, dims)
            save_result(massive, work / "massive_intervention.nc")
    return Path(folder)


def load_study(folder: str | Path) -> dict[str, xr.Dataset]:
    folder = Path(folder)
    study = {"run": open_run(folder / "run.zarr")}
    for name in RESULTS:
        if (folder / f"{name}.nc").exists():
            study[name] = open_result(folder / f"{name}.nc")
    return study


def summary(folder: str | Path) -> dict:
    """One row of the 'what each model shows' table, from saved results."""
    study = load_study(folder)
    run = study["run"].load()
    sink = et.sink_scores(run)
    by_layer = sink.mean(("sample", "head"))
    sink_layers = [int(x) for x in by_layer["layer"].values[by_layer.values >= 0.5]]
    strongest = sink.mean("sample").stack(lh=("layer", "head"))
    top = strongest.isel(lh=np.argsort(-strongest.values)[:3])
    drain = et.value_drain(run).ratio.median(("sample", "head"))
    span = et.residual_peak_span(run)
    entries = et.massive_activations(run)
    dims = et.massive_dimensions(entries, run.sizes["sample"])
    row = {
        "model": run.attrs["model"],
        "layers with mean sink score >= 0.5": _ranges(sink_layers) or "none",
        "strongest sink heads (layer.head: score)": ", ".join(
            f"{int(l)}.{int(h)}: {float(v):.2f}" for (l, h), v in zip(top["lh"].values, top.values)),
        "median sink value-norm ratio (layers 3+)": f"{float(drain.isel(layer=slice(3, None)).median()):.2f}",
        "residual peak (first token): appears at layer, max ratio": (
            f"{int(np.median(span.appears))}, {float(span.max_ratio.median()):.0f}x"),
        "massive dims (max value, share of samples)": ", ".join(
            f"{int(d)} ({float(v):.0f}, {float(f):.0%})"
            for d, v, f in zip(dims["dim"].values[:3], dims["max_value"].values[:3], dims["sample_fraction"].values[:3])
        ) or "none",
    }
    if "head_effects" in study:
        labels = et.classify_heads(sink.groupby("domain").mean(), study["head_effects"])
        share = (labels == "dormant").mean(("layer", "head"))
        row["dormant heads by domain"] = ", ".join(f"{d} {float(v):.0%}" for d, v in zip(share["domain"].values, share.values))
    if "streaming" in study:
        ppl = study["streaming"]["perplexity"].to_series()
        row["ppl beyond window 64: full / window / sinks+window"] = " / ".join(f"{ppl[c]:.1f}" for c in ppl.index)
    if "massive_intervention" in study:
        loss = study["massive_intervention"]["loss"].to_series()
        row["loss: original / massive zeroed / mean / random dims"] = " / ".join(f"{v:.2f}" for v in loss.values)
    return row


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i == len(values) - 1 or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def write_figures(folder: str | Path, out_dir: str | Path, formats=("svg", "png")) -> list[Path]:
    """Every extreme-token figure of one saved study, into ``out_dir``."""
    study = load_study(folder)
    run = study["run"].load()
    out_dir = Path(out_dir)
    sink = et.domain_sink_scores(run, include_all=False)
    late = int(run.sizes["layer"] * 2 // 3)
    one = run.isel(sample=0).sel(layer=late)
    max_abs = et.max_abs_activation(run)
    _, dims = _massive_source(run)
    figures = {
        "sink_scores_by_domain": (sink_score_by_domain(sink), "two"),
        "residual_norms": (residual_norm_heatmap(residual_norms(run), 0), "two"),
        "value_norm_vs_attention": (value_norm_vs_attention(one.attn_received, one.value_norm, one.token), "one"),
        "massive_activation_map": (massive_activation_map(max_abs), "two"),
        "massive_activation_profile": (massive_activation_profile(max_abs, dims), "one"),
    }
    if "head_effects" in study:
        labels = et.classify_heads(sink, study["head_effects"])
        figures["head_states"] = (head_state_map(study["head_effects"], labels), "two")
    if "scaling" in study:
        figures["first_token_scaling"] = (scaling_curves(study["scaling"]), "two")
    if "streaming" in study:
        figures["streaming"] = (condition_bars(study["streaming"], "perplexity", "Beyond a 64-token window",
                                               "perplexity"), "one")
    if "massive_intervention" in study:
        figures["massive_intervention"] = (condition_bars(study["massive_intervention"], "loss",
                                                          "Massive activations removed", "nats/token"), "one")
    written = []
    for name, (fig, columns) in figures.items():
        written += export_figure(fig, out_dir / name, formats=formats, columns=columns)
    return written
