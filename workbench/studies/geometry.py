"""Token geometry and layerwise updates for one model: every analysis of the phenomenon, saved as small files.

``run_study(handle, folder)`` saves into ``folder`` (written in ``<folder>.partial``, renamed when complete):

- ``geometry.nc``: ID over GRIDE scales, neighbourhood overlap, cosine statistics of ``prompts``
  prompts of ``prompt_tokens`` tokens (the bundled pydoc corpus), the prompts' mean loss and the
  ID-loss Spearman correlation per depth;
- ``shuffle.nc``: the same geometry for ``shuffle_prompts`` prompts shuffled in ``4**s`` blocks;
- ``trajectories.nc``: last-token trajectories of ``windows`` windows of ``window_tokens`` tokens:
  per-layer SVD, KL of rank-K truncated outputs, the linear drift fit, and a 3-D view;
- ``updates.nc`` / ``tokenwise.nc`` / ``fit_effect.nc``: update sizes by depth (sink tokens apart),
  the tokenwise fits and how their leftovers predict output change;
- ``stages.nc``: every layer deleted and every adjacent pair swapped, with the logit lens alongside;
- ``redundancy.nc`` and ``memory.json``: K/V recomputed from the residual, residual patching, and
  residual vs KV-cache bytes per token;
- ``summary.json`` last, with timings.

``write_figures`` and ``write_page`` work from saved files alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ..analyses import layer_stages, layer_updates, residual_redundancy, token_geometry, trajectories
from ..analyses.lens import lens_statistics, lens_summary
from ..corpus import load_corpus
from ..models import ModelHandle
from ..probes.states import last_token_states
from ..runs import RunExistsError, open_result, save_result, write_text_atomic
from .staging import staged_folder

DONE = "summary.json"
# Gemma 3 4B's published text configuration (written out: no download) ("The Residual Stream Is All You Need": 5 KB vs 136 KB per token)
GEMMA3_4B = dict(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256)


@dataclass(frozen=True)
class StudyConfig:
    """What the study depends on; the defaults are the committed run (minutes per model on 2 CPU cores)."""

    prompts: int = 32
    prompt_tokens: int = 512
    max_rank: int = 256  # GRIDE scales 2, 4, ..., max_rank
    shuffle_prompts: int = 8
    shuffle_levels: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # 4**s blocks
    windows: int = 400
    window_tokens: int = 32
    truncation_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    fit_ranks: tuple[int, ...] = (8, 32)
    effect_prompts: int = 4
    effect_tokens: int = 128
    stage_prompts: int = 8
    stage_tokens: int = 128
    seed: int = 0


def corpus_stream(tokenizer) -> list[list[int]]:
    """The bundled pydoc corpus, one token list per document (no special tokens)."""
    return [tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in load_corpus()]


def bos_id(tokenizer) -> int | None:
    """The token the tokenizer puts first by default (Gemma's ``<bos>``), or None (SmolLM2 adds none)."""
    first = tokenizer("a")["input_ids"][0]
    return first if tokenizer.bos_token_id is not None and first == tokenizer.bos_token_id else None


def with_bos(windows: list[list[int]], bos: int | None) -> list[list[int]]:
    return [w if bos is None else [bos] + w for w in windows]


def prompt_windows(docs: list[list[int]], n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens: consecutive non-overlapping windows of each document, documents in turn."""
    per_doc = [[d[i : i + length] for i in range(0, len(d) - length + 1, length)] for d in docs]
    out, depth = [], 0
    while len(out) < n and any(depth < len(w) for w in per_doc):
        out += [w[depth] for w in per_doc if depth < len(w)]
        depth += 1
    if len(out) < n:
        raise ValueError(f"the corpus gives only {len(out)} windows of {length} tokens; ask for fewer or shorter prompts.")
    return out[:n]


def _timed(seconds: dict, label: str, key: str, say, fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    seconds[key] = round(time.perf_counter() - start, 1)
    say(f"{label}: {key} in {seconds[key]} s")
    return out


def _geometry(handle, windows, config, progress):
    import workbench as wb

    windows = with_bos(windows, bos_id(handle.tokenizer))
    run = wb.capture(handle, windows, probes=["resid_pre", "resid_post", "logits"], batch_size=4, progress=progress)
    geometry = token_geometry.token_geometry(run, max_rank=config.max_rank, progress=progress)
    loss = token_geometry.prompt_loss(run)
    corr = token_geometry.id_loss_correlation(geometry, loss, seed=config.seed)
    geometry["mean_cross_entropy"] = loss.reset_coords(drop=True)
    geometry = geometry.assign(spearman=corr.spearman, spearman_low=corr.ci_low, spearman_high=corr.ci_high)
    return run, geometry


def _shuffled(handle, windows, config, progress):
    import workbench as wb

    rng = np.random.default_rng(config.seed)
    bos = bos_id(handle.tokenizer)
    parts = []
    for level in config.shuffle_levels:  # the BOS token, if the model uses one, stays first
        ids = with_bos([token_geometry.shuffle_blocks(w, level, rng) for w in windows], bos)
        run = wb.capture(handle, ids, probes=["resid_pre", "resid_post"], batch_size=4, progress=False)
        g = token_geometry.token_geometry(run, max_rank=config.max_rank, progress=progress)
        parts.append(g.drop_vars([c for c in g.coords if c not in g.dims]).expand_dims(level=[level]))
    return xr.concat(parts, "level", combine_attrs="drop_conflicts")


def _trajectories(handle, docs, config, progress):
    stream = [t for d in docs for t in d]
    windows = with_bos(trajectories.chunk_windows(stream, config.window_tokens, config.windows), bos_id(handle.tokenizer))
    states = last_token_states(handle, windows, progress=progress)
    array = xr.DataArray(states.numpy(), dims=("trajectory", "layer", "d_model"))
    svd = trajectories.trajectory_svd(array)
    ranks = [k for k in config.truncation_ranks if k <= min(handle.d_model, len(windows))]
    kl = trajectories.truncation_kl(handle, array, ranks)
    # in the top principal directions: at full rank the fit overfits (320 training trajectories, 576 dims for SmolLM2)
    rank = min(128, handle.d_model, int(round(0.8 * len(windows))))
    drift = trajectories.fit_linear_drift(array, seed=config.seed, rank=rank).rename(layer="transition")
    drift.attrs = {f"drift_{k}": v for k, v in drift.attrs.items()}  # its 'model' is an equation, its 'rank' a basis
    kl.attrs = {("truncation_layer" if k == "layer" else k): v for k, v in kl.attrs.items()}
    out = xr.merge([svd, kl, drift], combine_attrs="drop_conflicts")
    out["view"] = (("trajectory", "layer", "axis"), trajectories.bundle_view(array).values)
    out.attrs.update(windows=len(windows), window_tokens=config.window_tokens)
    return out


def _stages(handle, run, config, progress):
    sub = run.isel(sample=slice(0, config.stage_prompts), pos=slice(0, config.stage_tokens))
    ids = torch.from_numpy(sub["token_id"].values)
    sweep = layer_stages.layer_intervention_sweep(handle, ids, progress=progress)
    lens = lens_summary(lens_statistics(sub, handle))
    sweep["lens_entropy"] = ("layer_index", lens.entropy.values)
    sweep["lens_kl_to_final"] = ("layer_index", lens.kl_to_final.values)
    return sweep.assign_coords(layer_index=np.arange(handle.n_layers))


def _redundancy(handle, windows, progress):
    a, b = (torch.tensor(with_bos([w[:64]], bos_id(handle.tokenizer))) for w in windows[:2])
    return xr.merge([residual_redundancy.kv_recompute_error(handle, a, b),
                     residual_redundancy.residual_patch_kl(handle, a, b)], combine_attrs="drop_conflicts")


def run_study(handle: ModelHandle, folder: str | Path, config: StudyConfig = StudyConfig(), *, overwrite: bool = False,
              progress: bool = True, say=print) -> Path:
    """Run every analysis of the phenomenon on ``handle``; save into ``folder``."""
    folder = Path(folder)
    if (folder / DONE).exists() and not overwrite:
        raise RunExistsError(f"{folder} already holds a geometry study; pass overwrite=True (--recompute) to redo it.")
    if config.prompt_tokens < config.max_rank + 1:
        raise ValueError(f"prompt_tokens={config.prompt_tokens} is too short for GRIDE up to rank {config.max_rank}: "
                         f"use at least {config.max_rank + 1} tokens or lower max_rank.")
    if config.prompts < 4 or config.windows < 10 or config.shuffle_prompts < 1:
        raise ValueError(f"prompts={config.prompts}, windows={config.windows}, shuffle_prompts={config.shuffle_prompts}: "
                         "the ID-loss correlation needs at least 4 prompts, the drift fit at least 10 trajectories "
                         "(8 to fit, 2 held out), and the shuffle control at least 1 prompt.")
    docs = corpus_stream(handle.tokenizer)
    body = config.prompt_tokens - (bos_id(handle.tokenizer) is not None)  # prompts of prompt_tokens with the BOS
    windows = prompt_windows(docs, config.prompts, body)  # errors now, before any forward pass
    seconds: dict[str, float] = {}
    label = handle.name
    with staged_folder(folder, overwrite=True) as work:
        run, geometry = _timed(seconds, label, "geometry", say, _geometry, handle, windows, config, progress)
        save_result(geometry, work / "geometry.nc")
        shuffled = _timed(seconds, label, "shuffle", say, _shuffled, handle, windows[: config.shuffle_prompts], config,
                          progress)
        save_result(shuffled, work / "shuffle.nc")
        stats = layer_updates.update_statistics(run)
        sinks = layer_updates.sink_tokens(run)
        save_result(_timed(seconds, label, "update statistics", say, layer_updates.depth_profile, stats, sinks),
                    work / "updates.nc")
        tokenwise, fit = _timed(seconds, label, "tokenwise fit", say, layer_updates.tokenwise_fit, run,
                                ranks=config.fit_ranks, exclude=sinks, seed=config.seed, progress=progress)
        save_result(tokenwise, work / "tokenwise.nc")
        held_out = run.isel(sample=tokenwise.attrs["test_samples"][: config.effect_prompts],
                            pos=slice(0, config.effect_tokens))
        effect = _timed(seconds, label, "fit effect", say, layer_updates.fit_residual_effect, handle,
                        torch.from_numpy(held_out["token_id"].values), None, fit, progress=progress)
        save_result(effect, work / "fit_effect.nc")
        save_result(_timed(seconds, label, "stages", say, _stages, handle, run, config, progress), work / "stages.nc")
        del run
        save_result(_timed(seconds, label, "trajectories", say, _trajectories, handle, docs, config, progress),
                    work / "trajectories.nc")
        save_result(_timed(seconds, label, "redundancy", say, _redundancy, handle, windows, progress),
                    work / "redundancy.nc")
        from transformers import Gemma3TextConfig

        memory = {label: residual_redundancy.cache_memory(handle.hf_model.config),
                  "gemma-3-4b": residual_redundancy.cache_memory(Gemma3TextConfig(**GEMMA3_4B))}
        write_text_atomic(work / "memory.json", json.dumps(memory, indent=1))
        write_text_atomic(work / DONE, json.dumps({"name": label, "n_layers": handle.n_layers, "d_model": handle.d_model,
                                                   "seconds": seconds, "config": asdict(config)}, indent=1))
    return folder


FILES = ("geometry", "shuffle", "trajectories", "updates", "tokenwise", "fit_effect", "stages", "redundancy")


def load_study(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / DONE).exists():
        raise FileNotFoundError(f"no finished geometry study in {folder}; run `workbench geometry`.")
    out: dict = {"summary": json.loads((folder / DONE).read_text()),
                 "memory": json.loads((folder / "memory.json").read_text())}
    for key in FILES:
        out[key] = open_result(folder / f"{key}.nc")
    return out


def _peak(g: xr.Dataset, scale: int = 2) -> tuple[float, int]:
    """The largest median ID over prompts (depth >= 1: the embedding cloud is not contextual) and its depth."""
    med = g.id.sel(scale=scale).median("sample").sel(depth=g.depth.values[1:])
    return float(med.max()), int(med.idxmax())


def summary(name: str, s: dict) -> dict[str, str]:
    """The README row: one number per claim, each with what it measures."""
    g, sh, n = s["geometry"], s["shuffle"], s["summary"]["n_layers"]
    peak, at = _peak(g)
    shuffled_peak, shuffled_at = _peak(sh.sel(level=sh.level.values[-1]))
    structured_peak, _ = _peak(sh.sel(level=0))
    rho = g.spearman.sel(depth=at)
    st = s["stages"]
    delete = st.where(st.kind == "delete", drop=True)
    swap = st.where(st.kind == "swap", drop=True)
    red, fit, effect = s["redundancy"], s["tokenwise"], s["fit_effect"]
    mem = s["memory"][name]
    t = s["trajectories"]
    small = t["rank"].values[t.kl_mean.values < 0.1]
    return {
        "model": name,
        "ID peak (TwoNN, median of prompts) at depth": f"{peak:.1f} at {at}/{n}",
        "ID peak, original -> fully shuffled": f"{structured_peak:.1f} -> {shuffled_peak:.1f}",
        "Spearman(ID, loss) at the peak [95% CI]": f"{float(rho):+.2f} [{float(g.spearman_low.sel(depth=at)):+.2f}, "
                                                   f"{float(g.spearman_high.sel(depth=at)):+.2f}]",
        "overlap k=1 (median over prompts and depths)": f"{float(g.overlap.sel(k=1).median()):.2f}",
        "trajectories: PCs for 90% (last depth); K with KL < 0.1 nats":
            f"{int(t.components_90.isel(layer=-1))} of {s['summary']['d_model']}; "
            f"{int(small[0]) if len(small) else '>' + str(int(t['rank'].values[-1]))}",
        "next-layer error: linear drift / no update (median)":
            f"{float(t.linear_drift.sel(metric='relative_error').median()):.2f} / "
            f"{float(t.no_update.sel(metric='relative_error').median()):.2f}",
        "top-1 kept: delete layer 0 / median delete / median swap":
            f"{float(delete.top1_retention.isel(intervention=0)):.2f} / {float(delete.top1_retention.median()):.2f} / "
            f"{float(swap.top1_retention.median()):.2f}",
        "tokenwise fit R^2 (full, median layer) / Spearman(leftover, KL)":
            f"{float(fit.r2.sel(fit='full').median()):.2f} / {float(effect.spearman.median()):.2f}",
        "K/V from residual: max diff; patch KL whole / last pos":
            f"{max(float(red.key_max_abs_diff.max()), float(red.value_max_abs_diff.max())):.1g}; "
            f"{float(red.kl_full.max()):.1g} / {float(red.kl_last_position.median()):.2g}",
        "residual vs KV bytes/token (bf16)": f"{mem['residual_bytes_per_token'] / 1024:.2g} KiB vs "
                                             f"{mem['kv_bytes_per_token'] / 1024:.3g} KiB",
    }


def write_figures(folders: dict[str, Path], out: Path, formats=("svg", "png")) -> list[Path]:
    from ..plots import geometry as plots
    from ..plots.export import export_figure

    studies = {s["summary"]["name"]: s for s in (load_study(f) for f in folders.values())}
    out.mkdir(parents=True, exist_ok=True)
    pick = lambda key: {name: s[key] for name, s in studies.items()}  # noqa: E731
    written = export_figure(plots.id_profile(pick("geometry")), out / "id_profile", formats=formats, columns="one",
                            height=240)
    written += export_figure(plots.id_loss_figure(pick("geometry")), out / "id_vs_loss", formats=formats,
                             columns="one", height=240)
    for name, s in studies.items():
        written += export_figure(plots.geometry_curves(s["shuffle"], title=f"{name}: tokens shuffled in 4^s blocks"),
                                 out / f"shuffle_{name}", formats=formats, columns="two", height=250)
    written += export_figure(plots.trajectories_figure(pick("trajectories")), out / "trajectories", formats=formats,
                             columns="two", height=260)
    written += export_figure(plots.update_profile(pick("updates")), out / "update_norms", formats=formats,
                             columns="two", height=260)
    layers = {name: s["summary"]["n_layers"] for name, s in studies.items()}
    written += export_figure(plots.tokenwise_figure(pick("tokenwise"), pick("fit_effect"), layers), out / "tokenwise_fit",
                             formats=formats, columns="two", height=260)
    written += export_figure(plots.stages_figure(pick("stages")), out / "stages", formats=formats, columns="two",
                             height=270)
    memory = {k: v for s in studies.values() for k, v in s["memory"].items()}
    written += export_figure(plots.redundancy_figure(pick("redundancy"), memory), out / "redundancy", formats=formats,
                             columns="two", height=260)
    return written


def write_page(folders: dict[str, Path], out: Path, page: Path) -> str:
    """The gallery page; returns its first table (the README's)."""
    from .tables import markdown_table

    studies = {s["summary"]["name"]: s for s in (load_study(f) for f in folders.values())}
    table = markdown_table([summary(name, s) for name, s in studies.items()])
    configs = "; ".join(f"{name}: {s['summary']['config']['prompts']} prompts x {s['summary']['config']['prompt_tokens']} "
                        f"tokens, {s['summary']['config']['windows']} trajectories" for name, s in studies.items())
    figures = "\n".join(f"- [{p.stem}](geometry/{p.name})" for p in sorted((out / "geometry").glob("*.svg")))
    write_text_atomic(page, f"""# Token geometry and layerwise updates in the embedded models

Produced by `workbench geometry` on the bundled pydoc corpus ({configs}; each step's seconds are in the
saved `summary.json`); regenerate the figures from saved results with `workbench gallery`. Depth t is the residual entering block t (t = 0: the embeddings; the
last depth: what leaves the last block). ID: GRIDE maximum likelihood at neighbour ranks n1 -> 2 n1 (scale 2 is
TwoNN; every scale up to 256 is saved), on each prompt's distinct token vectors (Viswanathan et al.); overlap:
share of each token's nearest neighbour kept from one depth to the next; shuffles cut a prompt into 4^s blocks
(s = 0..5) and permute them. Stages: every layer deleted and every adjacent pair swapped (Lad et al.), scored on
the first tokens of the first prompts. Tokenwise fit: the update as a linear map of the token's direction
h / ||h|| (what its PreNorm block reads), fitted on 3/4 of the prompts, scored on the rest. Redundancy: K/V at layer l recomputed from the residual entering l alone,
and prompt A's residual patched into prompt B (all positions vs the last one only).

{table}

## Figures

{figures}
""")
    return table
