"""The byte-level ensemble of two models with different vocabularies, measured with confidence intervals.

"Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles"
(Phan et al., 2024) reports that models with different tokenizers, each made an exact byte-level
model, can be averaged byte by byte, up to 3.7% better than the members. Here: SmolLM2-135M
(49k byte-level BPE) and Gemma 3 270M (262k SentencePiece-style vocabulary) on held-out real
prose and code (:func:`~workbench.corpus.text_blocks`), each text scored from the start of a
document, every byte with the exact next-byte distribution.

Split: the blocks of each domain are shuffled (``seed``); the first ones, up to
``validation_bytes``, are the validation split, the next ones, up to ``test_bytes``, the test
split. The validation split alone chooses the fixed mixture weight (grid ``weight_step``) and the
online mixture's share (:func:`~workbench.analyses.byte_ensemble.online_mixture_logprob`); the test
split is scored once with those choices. Rows of the result: each model, the equal-weight
mixture (the paper's rule: its code averages the members' next-byte probabilities with equal
weights), the tuned fixed weight, and the weights learned online byte by byte within each text.
Bits per byte and each row's gain over the better member come with paired bootstrap intervals
over the test texts (:func:`~workbench.analyses.byte_ensemble.bits_per_byte_intervals`).

The pruning (``prune=1e-4``, ``max_hypotheses=16``) was chosen on pydoc bytes 200,000-200,600 (its
document is left out of both splits): on the first 400 of them, against the defaults (1e-5, 32),
Gemma 3's bits per byte moved from 0.9848 to 0.9847 and its stream ran 1.6x faster with 2.19
instead of 4.04 token positions per byte (54.8 s against 85.8 s, both beside other work;
``benchmarks/byte_level.py --exact-only --model gemma3-270m --bytes 400 --offset 200000 --threads 1``,
with and without ``--prune 1e-4 --max-hypotheses 16``; RESULTS.md). Every text's pruned posterior is saved and
reported.

``run_study(folder)`` scores both models (chunks of texts in parallel processes, one thread each,
when the machine has the cores) and saves ``results.nc``: every byte's log-probability under each member,
with its text, domain and split. ``evaluate``, ``summary`` and ``write_figures`` work from that file.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses.byte_bias import PAPER
from ..analyses.byte_ensemble import bits_per_byte_intervals, mixture_logprob, online_mixture_logprob, weight_grid
from ..corpus import load_corpus, text_blocks
from ..locks import WriterBusyError, exclusive
from ..plots.export import export_figure
from ..runs import open_result, save_result
from .staging import staged_folder
from .tables import markdown_table
from .text_scores import TextScores

RESULTS_FILE = "results.nc"
DOMAINS = ("prose", "code")
TUNING_BYTES = (200_000, 200_600)  # pydoc bytes (documents joined by blank lines) the pruning was chosen on


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs on; the defaults are the committed experiment."""

    models: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
    test_bytes: int = 50_000  # per domain, at least
    validation_bytes: int = 2_000  # per domain, at least
    seed: int = 0
    prune: float = 1e-4
    max_hypotheses: int = 16
    weight_step: float = 0.05
    shares: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.2)
    confidence: float = 0.95
    n_resamples: int = 10_000


def _tuning_document() -> int:
    """The pydoc document holding the bytes the pruning was chosen on (left out of the splits)."""
    start = 0
    for doc, record in enumerate(load_corpus("pydoc")):
        end = start + len(record["text"].encode("utf-8"))
        if start <= TUNING_BYTES[0] < end:
            return doc
        start = end + 2  # the blank line between documents
    raise ValueError("the pydoc corpus is shorter than the tuning bytes")


def heldout_texts(config: StudyConfig = StudyConfig()) -> list[dict]:
    """The texts of both splits: ``[{"domain", "split", "source", "text"}, ...]``, validation first per domain."""
    left_out = f"pydoc:{_tuning_document()}"
    out = []
    for domain in DOMAINS:
        blocks = [b for b in text_blocks(domain) if b[0] != left_out]
        random.Random(config.seed).shuffle(blocks)
        used = {"validation": 0, "test": 0}
        for source, text in blocks:
            split = "validation" if used["validation"] < config.validation_bytes else "test"
            if split == "test" and used["test"] >= config.test_bytes:
                break
            used[split] += len(text.encode("utf-8"))
            out.append({"domain": domain, "split": split, "source": source, "text": text})
        if used["test"] < config.test_bytes:
            raise ValueError(f"the {domain} blocks hold {sum(used.values())} bytes; asked for "
                             f"{config.validation_bytes} + {config.test_bytes}: lower test_bytes (--test-bytes).")
    return out


_MODELS: dict = {}  # (model name, prune, max_hypotheses) -> ByteLevelModel, loaded once per worker process
_CHUNK_BYTES = 2_000  # texts are scored in chunks of about this many bytes, so that both cores stay busy to the end


def _score(model, texts: list[str], prune: float, max_hypotheses: int) -> list[dict]:
    """Every byte's exact log-probability under one model (a name, loaded once per process, or a handle): one record
    per text (``logprob``, ``renormalised`` log-mass kept by the pruning, ``seconds``, ``calls``, ``positions``)."""
    import workbench as wb
    from ..analyses.byte_level import ByteLevelModel
    from ..threads import single_thread

    with single_thread():
        if isinstance(model, str):
            key = (model, prune, max_hypotheses)
            if key not in _MODELS:
                _MODELS[key] = ByteLevelModel(wb.load_model(model), prune=prune, max_hypotheses=max_hypotheses)
            byte_model = _MODELS[key]
        else:
            byte_model = ByteLevelModel(model, prune=prune, max_hypotheses=max_hypotheses)
        records = []
        for text in texts:
            started, calls, positions = time.perf_counter(), byte_model.calls, byte_model.positions
            ds = byte_model.stream(text, progress=False)  # each text from the start of a document
            records.append({"logprob": ds["logprob"].values,
                            "renormalised": float(np.log1p(-ds["pruned_fraction"].values).sum()),
                            "seconds": time.perf_counter() - started, "calls": byte_model.calls - calls,
                            "positions": byte_model.positions - positions})
        return records


def _chunks(indices: list[int], bodies: list[str]) -> list[list[int]]:
    """``indices`` (of ``bodies``) in consecutive groups of about ``_CHUNK_BYTES`` bytes."""
    out, size = [[]], 0
    for i in indices:
        if out[-1] and size >= _CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += len(bodies[i].encode("utf-8"))
    return [c for c in out if c]


def _settings(config: StudyConfig) -> dict:
    """What a text's scores depend on besides the model and the text."""
    return {"prune": config.prune, "max_hypotheses": config.max_hypotheses}


BY_NAME = "by name"  # the weights of a model the study loads by name (an embedded model: a pinned file)


def _weights_id(model) -> str:
    """Which weights a member's scores come from: a handle's weight-file hash and dtype, so two models that share
    a name (``checkpoint-1000`` of two training runs) never share scores; a model loaded by name: ``BY_NAME``."""
    return BY_NAME if isinstance(model, str) else f"{model.file_hash} {model.dtype}"


def _saved_records(folder: Path, names: list[str], settings: dict,
                   weights: dict[str, str]) -> dict[tuple[str, str], dict]:
    """``{(model, text): record}`` from a study saved in ``folder`` with the same ``settings`` and, per model, the
    same ``weights`` (:func:`_weights_id`; else nothing of that model).

    Studies saved before the scoring cost was recorded per text give NaN costs; before the weights were recorded,
    their members count as loaded by name."""
    if not (folder / RESULTS_FILE).exists():
        return {}
    try:
        ds = load_study(folder)
    except Exception as err:  # a damaged file: nothing is reused from it, and the user is told
        print(f"  not reusing the scores in {folder / RESULTS_FILE}: {err}", flush=True)
        return {}
    if {k: json.loads(ds.attrs["config"])[k] for k in settings} != settings:
        return {}
    texts = json.loads(ds.attrs["texts"])
    bounds = np.cumsum([0, *ds["n_bytes"].values])
    out = {}
    saved_weights = ds["weights"].values if "weights" in ds.coords else [BY_NAME] * ds.sizes["member"]
    for name, saved_id in zip([str(m) for m in ds["member"].values], saved_weights):
        if name not in names or str(saved_id) != weights[name]:
            continue
        member = ds.sel(member=name)
        for t, text in enumerate(texts):
            cost = {k: float(member[k].values[t]) if "text" in member[k].dims else math.nan
                    for k in ("seconds", "calls", "positions")}
            out[name, text] = {"logprob": member["logprob"].values[bounds[t]:bounds[t + 1]],
                               "renormalised": float(member["renormalised_logmass"].values[t]), **cost}
    return out


def run_study(folder: str | Path, config: StudyConfig = StudyConfig(), *, handles: dict | None = None,
              overwrite: bool = False, reuse: bool = True, progress: bool = True) -> Path:
    """Score the held-out texts with each model and save ``results.nc`` under ``folder`` (staged; see :mod:`.staging`).

    ``handles``: ``{name: ModelHandle}`` to use instead of loading ``config.models`` (scored in this
    process). Otherwise the texts are scored in chunks of about 2,000 bytes by one process per core,
    one thread each, every process loading the models it is given once: both cores stay busy until
    the end, whichever model is slower.

    Resumable: every text's scores are kept on disk as they come back (:mod:`.text_scores`), so a
    run that was interrupted, rerun alike, scores only the texts it had not finished. With
    ``reuse`` (the default) the texts a study already saved in ``folder`` scored with the same
    models (same name and weights), ``prune`` and ``max_hypotheses`` are taken from it too (rerunning with more
    ``test_bytes`` scores only the new texts; needs ``overwrite``). ``reuse=False`` scores every
    text again.
    """
    texts = heldout_texts(config)
    bodies = [t["text"] for t in texts]
    models = list(handles.values()) if handles is not None else list(config.models)
    names = [m.name for m in handles.values()] if handles is not None else list(config.models)
    if len(set(names)) < len(names):
        raise ValueError(f"two models are called alike ({names}): give each member a distinct name.")
    weights = dict(zip(names, map(_weights_id, models)))
    keys = {name: {**_settings(config), "weights": weights[name]} for name in names}  # what a text's scores depend on
    store = TextScores(folder)
    with staged_folder(folder, overwrite) as work:
        started = time.perf_counter()
        if not reuse:
            store.clear()
        store.drop_temporary()
        saved = _saved_records(Path(folder), names, _settings(config), weights) if reuse else {}
        records: dict[tuple[int, int], dict] = {}
        for m, name in enumerate(names):
            for i, body in enumerate(bodies):
                record = store.get(name, keys[name], body) or saved.get((name, body))
                if record is not None:
                    records[m, i] = record
        todo = {m: [i for i in range(len(bodies)) if (m, i) not in records] for m in range(len(models))}
        tasks = sorted(((m, chunk) for m in todo for chunk in _chunks(todo[m], bodies)), key=lambda t: (t[1][0], t[0]))
        if progress and records:
            print(f"  reusing the scores of {len(records)} of {len(names) * len(bodies)} (model, text) pairs "
                  "from an interrupted or earlier run", flush=True)
        done = [0] * len(models)  # bytes scored per model

        def report(task: int, result: list[dict]) -> None:
            m, chunk = tasks[task]
            for i, record in zip(chunk, result):
                store.put(names[m], keys[names[m]], bodies[i], record)  # on disk before it is counted
                records[m, i] = {**record, "scored_here": True}
                done[m] += len(bodies[i].encode("utf-8"))
            if progress:
                print(f"  {names[m]}: {done[m]} bytes scored, {time.perf_counter() - started:.0f} s", flush=True)

        workers = min(os.cpu_count() or 1, len(tasks))
        if handles is not None or workers < 2:
            for task, (m, chunk) in enumerate(tasks):
                report(task, _score(models[m], [bodies[i] for i in chunk], config.prune, config.max_hypotheses))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_score, models[m], [bodies[i] for i in chunk], config.prune,
                                       config.max_hypotheses): task for task, (m, chunk) in enumerate(tasks)}
                for future in as_completed(futures):
                    report(futures[future], future.result())
        per_text = {k: (("member", "text"), np.array([[records[m, i][k] for i in range(len(bodies))]
                                                      for m in range(len(models))], dtype=float))
                    for k in ("seconds", "calls", "positions")}
        n_bytes = np.array([len(b.encode("utf-8")) for b in bodies])
        ds = xr.Dataset(
            {
                "logprob": (("member", "pos"), np.stack([np.concatenate([records[m, i]["logprob"] for i in range(len(bodies))])
                                                         for m in range(len(models))])),
                "renormalised_logmass": (("member", "text"), np.array(
                    [[records[m, i]["renormalised"] for i in range(len(bodies))] for m in range(len(models))])),
                **per_text,
                "scored_here": (("member", "text"), np.array(
                    [[records[m, i].get("scored_here", False) for i in range(len(bodies))] for m in range(len(models))])),
            },
            coords={
                "member": names,
                "weights": ("member", [weights[name] for name in names]),
                "text_of_byte": ("pos", np.repeat(np.arange(len(bodies)), n_bytes)),
                "text": np.arange(len(bodies)),
                "n_bytes": ("text", n_bytes),
                "domain": ("text", [t["domain"] for t in texts]),
                "split": ("text", [t["split"] for t in texts]),
                "source": ("text", [t["source"] for t in texts]),
            },
            attrs={"config": json.dumps(asdict(config)), "paper": PAPER, "texts": json.dumps(bodies),
                   "study_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count() or 1},
        )
        save_result(ds, work / RESULTS_FILE)
    try:  # every score is in the saved study now
        with exclusive(Path(folder), what="study"):
            store.clear()
    except WriterBusyError:  # another run of the study started at once: the records are its to use
        pass
    return Path(folder)


def load_study(folder: str | Path) -> xr.Dataset:
    folder = Path(folder)
    if not (folder / RESULTS_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no byte-ensemble study ({RESULTS_FILE} missing); run run_study().")
    return open_result(folder / RESULTS_FILE)


def _per_text(logprob: np.ndarray, text_of_byte: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Total nats (``-log P``) of each of ``texts``."""
    return np.array([-logprob[text_of_byte == t].sum() for t in texts])


def _bits(logprob: np.ndarray) -> float:
    return float(-logprob.sum() / (logprob.size * math.log(2)))


def _online(member: np.ndarray, text_of_byte: np.ndarray, share: float) -> np.ndarray:
    """Online mixture log-probabilities, restarted with equal weights at every text."""
    out = np.empty(member.shape[1])
    for t in np.unique(text_of_byte):
        where = text_of_byte == t
        out[where] = online_mixture_logprob(member[:, where], share)
    return out


def evaluate(ds: xr.Dataset) -> xr.Dataset:
    """Bits per byte with intervals, per domain and both together: each model and three mixtures.

    Per domain, the fixed weight and the online share are chosen on the validation texts (lowest
    bits per byte; ties to the equal weights, the smaller share) and applied to the test texts.
    Dims: (domain, predictor) ``bits_per_byte``, ``low``, ``high``, ``gain``, ``gain_low``,
    ``gain_high`` (relative to the better member of that domain), and (domain,) ``weight``,
    ``share``, ``test_bytes``, ``test_texts``.
    """
    config = json.loads(ds.attrs["config"])
    members = [str(m) for m in ds["member"].values]
    lp_all = ds["logprob"].values
    text_of_byte = ds["text_of_byte"].values
    rows = [*members, "ensemble, equal weights", "ensemble, tuned weight", "ensemble, online weights"]
    results, weights, shares, pooled = {}, {}, {}, {r: [] for r in rows}
    pooled_bytes = []
    for domain in DOMAINS:
        chosen = {}
        for split in ("validation", "test"):
            texts = ds["text"].values[(ds["domain"].values == domain) & (ds["split"].values == split)]
            where = np.isin(text_of_byte, texts)
            chosen[split] = (texts, lp_all[:, where], text_of_byte[where])
        _, val, val_text = chosen["validation"]
        grid = weight_grid(len(members), config["weight_step"])
        spread = np.abs(grid - 1 / len(members)).sum(axis=1)
        val_bits = [_bits(mixture_logprob(val, w)) for w in grid]
        best = grid[min(range(len(grid)), key=lambda g: (round(val_bits[g], 9), spread[g]))]
        share_bits = [_bits(_online(val, val_text, s)) for s in config["shares"]]
        share = config["shares"][int(np.argmin(np.round(share_bits, 9)))]
        texts, test, test_text = chosen["test"]
        mixed = {
            "ensemble, equal weights": mixture_logprob(test, np.full(len(members), 1 / len(members))),
            "ensemble, tuned weight": mixture_logprob(test, best),
            "ensemble, online weights": _online(test, test_text, share),
        }
        nats = {m: _per_text(test[i], test_text, texts) for i, m in enumerate(members)}
        nats.update({r: _per_text(v, test_text, texts) for r, v in mixed.items()})
        n_bytes = ds["n_bytes"].values[texts]
        results[domain] = bits_per_byte_intervals(nats, n_bytes, "best", confidence=config["confidence"],
                                                  n_resamples=config["n_resamples"], seed=config["seed"])
        weights[domain], shares[domain] = best, share
        for r in rows:
            pooled[r].append(nats[r])
        pooled_bytes.append(n_bytes)
    results["both"] = bits_per_byte_intervals({r: np.concatenate(v) for r, v in pooled.items()},
                                              np.concatenate(pooled_bytes), "best", confidence=config["confidence"],
                                              n_resamples=config["n_resamples"], seed=config["seed"])
    domains = [*DOMAINS, "both"]
    out = xr.concat([results[d] for d in domains], dim="domain").assign_coords(domain=domains)
    out["weight"] = (("domain", "member"), np.array([weights.get(d, np.full(len(members), np.nan)) for d in domains]))
    out["share"] = ("domain", [shares.get(d, np.nan) for d in domains])
    out["test_bytes"] = ("domain", [int(results[d].attrs["n_bytes"]) for d in domains])
    out["test_texts"] = ("domain", [int(results[d].attrs["n_texts"]) for d in domains])
    out["baseline"] = ("domain", [results[d].attrs["baseline"] for d in domains])
    out = out.assign_coords(member=members)
    out.attrs = {k: v for k, v in results["both"].attrs.items() if k in ("confidence", "n_resamples", "method")}
    return out


def _interval(value: float, low: float, high: float, percent: bool = False) -> str:
    if percent:
        return f"{100 * value:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def summary_rows(ev: xr.Dataset) -> list[dict]:
    """One row per predictor of an :func:`evaluate` result: bits per byte [interval] and gain over the better member
    [interval], per domain."""
    rows = []
    for predictor in [str(p) for p in ev["predictor"].values]:
        row = {"model": predictor}
        for domain in [str(d) for d in ev["domain"].values]:
            e = ev.sel(domain=domain, predictor=predictor)
            label = f"{domain} ({int(ev['test_bytes'].sel(domain=domain))} bytes, {int(ev['test_texts'].sel(domain=domain))} texts)"
            row[f"bits per byte, {label}"] = _interval(float(e.bits_per_byte), float(e.low), float(e.high))
            gain = "baseline" if predictor == str(ev["baseline"].sel(domain=domain).values) else _interval(
                float(e.gain), float(e.gain_low), float(e.gain_high), percent=True)
            row[f"gain over the better model, {domain}"] = gain
        rows.append(row)
    return rows


def significance(ev: xr.Dataset) -> str:
    """A line per domain: which mixtures are significantly better or worse than the better model (the gain's interval
    above or below 0), and which are not (from an :func:`evaluate` result)."""
    lines = []
    for domain in [str(d) for d in ev["domain"].values]:
        e = ev.sel(domain=domain)
        better = [str(p) for p in e["predictor"].values if str(p).startswith("ensemble") and float(e.gain_low.sel(predictor=p)) > 0]
        worse = [str(p) for p in e["predictor"].values if str(p).startswith("ensemble") and float(e.gain_high.sel(predictor=p)) < 0]
        unclear = [str(p) for p in e["predictor"].values if str(p).startswith("ensemble") and str(p) not in better + worse]
        parts = [f"**{domain}**, against {e['baseline'].values}:"]
        for verdict, names in (("Significantly better", better), ("Significantly worse", worse),
                               ("No significant difference (the interval holds 0)", unclear)):
            if names:
                parts.append(f"{verdict}: " + "; ".join(n.removeprefix("ensemble, ") for n in names) + ".")
        lines.append(" ".join(parts))
    return "\n".join(f"- {line}" for line in lines)


def _cost(ds: xr.Dataset) -> str:
    """Each model's scoring time (one thread) over the texts whose time was recorded, and what the last run did."""
    n_bytes = ds["n_bytes"].values
    parts = []
    for m in [str(m) for m in ds["member"].values]:
        member = ds.sel(member=m)
        if "text" in member["seconds"].dims:
            known = np.isfinite(member["seconds"].values)
            seconds, positions = member["seconds"].values[known].sum(), member["positions"].values[known].sum()
            scored = int(n_bytes[known].sum())
        else:  # saved before the cost was kept per text
            seconds, positions, scored = float(member["seconds"]), float(member["positions"]), int(n_bytes.sum())
        over = f", over the {scored} of {n_bytes.sum()} bytes whose time was recorded" if scored < n_bytes.sum() else ""
        parts.append(f"{m} {seconds:.0f} s ({positions / max(scored, 1):.2f} token positions per byte{over})")
    run = f"the run that saved the study took {ds.attrs['study_seconds']:.0f} s on {ds.attrs['cpu_count']} cores"
    if "scored_here" in ds and not ds["scored_here"].values.all():
        here = ds["scored_here"].values
        run += (f" and scored {int(here.sum())} of the {here.size} (model, text) pairs; the others' scores came from "
                "earlier runs of the study (interrupted, or with fewer test bytes)")
    return ", ".join(parts) + "; " + run


def summary(folder: str | Path) -> str:
    """The set-up in a paragraph, the table, and what is significant."""
    ds = load_study(folder)
    ev = evaluate(ds)
    config = json.loads(ds.attrs["config"])
    members = [str(m) for m in ds["member"].values]
    validation = {d: int(ds["n_bytes"].values[(ds["domain"].values == d) & (ds["split"].values == "validation")].sum())
                  for d in DOMAINS}
    chosen = "; ".join(
        f"{d}: weight {'/'.join(f'{w:.2f}' for w in ev['weight'].sel(domain=d).values)}, share {float(ev['share'].sel(domain=d)):g}"
        for d in DOMAINS)
    pruned = float(-np.expm1(ds["renormalised_logmass"].values).max())
    cost = _cost(ds)
    setup = (
        f"Held-out texts: prose paragraphs of the pydoc corpus and CPython standard-library code "
        f"(`workbench.corpus.text_blocks`), each scored from the start of a document, shuffled with seed {config['seed']} "
        f"into a validation split ({validation['prose']} prose + {validation['code']} code bytes), which alone chose the "
        f"mixture weight (grid step {config['weight_step']}) and the online share ({chosen}), and a test split scored "
        f"once. Exact byte-level models with prune {config['prune']:g}, at most {config['max_hypotheses']} "
        f"tokenizations followed (largest renormalisation of one text for pruning: {pruned:.1e} of its probability). "
        f"Intervals: {int(100 * ev.attrs['confidence'])}% {ev.attrs['method']}, {ev.attrs['n_resamples']} resamples, "
        f"texts as units. Gain: 1 - bits per byte / that of the better model in the domain. "
        f"Scoring time, one thread: {cost}."
    )
    return setup + "\n\n" + markdown_table(summary_rows(ev)) + "\n" + significance(ev) + "\n"


FIGURES = ("ensemble_intervals",)


def write_summary(folder: str | Path, path: str | Path) -> Path:
    """Write :func:`summary` (markdown, with a link to the figure) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# The byte-level ensemble, measured\n\n"
        "\"Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles\" "
        "(Phan et al., 2024): SmolLM2-135M and Gemma 3 270M, each an exact byte-level model, mixed byte by byte.\n\n"
        + summary(folder) + "\n## Figures\n\n" + "\n".join(f"- [{s}]({s}.svg)" for s in FIGURES) + "\n",
        encoding="utf-8")
    return path


def write_figures(folder: str | Path, out_dir: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
    """Into ``out_dir``: bits per byte and gains with their intervals, per domain."""
    from ..plots.byte_level import ensemble_intervals_figure

    fig = ensemble_intervals_figure(evaluate(load_study(folder)))
    return export_figure(fig, Path(out_dir) / "ensemble_intervals", formats=formats, columns="two", height=380)
