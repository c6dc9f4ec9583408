"""How fast do the explorers answer a control over results already computed, on a 30-layer model?

Run from the repository root:

    .venv/bin/python benchmarks/widgets.py               # Python side, then in JupyterLab in Chromium
    .venv/bin/python benchmarks/widgets.py --no-browser  # Python side only

On SmolLM2-135M (30 layers; float32 from the embedded 4-bit GGUF), every explorer the notebooks use is
built over real results: residual norms of 8 prompts, the extreme-token run of the bundled domain samples
(attention patterns of the prompts shown already captured), the logit lens of one prompt, the token
geometry of 8 prompts, the tokenizer premiums and the byte lens at a few cuts already computed.

Python side: each control is moved ``--moves`` times over values whose results are at hand (a slider
steps through its range, a dropdown cycles its options) and the time from setting the value to the
explorer's figures holding the new view (``explorer.wait()`` returned) is recorded: median and p95 per
control. This is the kernel's share; sending the figure to the page is not in it.

Browser side (Playwright driving Debian's Chromium, JupyterLab on loopback): a notebook builds the same
residual-norm, extreme-token and lens explorers; each slider is stepped with the arrow key ``--moves``
times, and the time from the key press until the figures' SVG stops changing (no change for 300 ms,
time taken at the last change) is recorded: what a person waits for.

Printed: machine, threads, other processes' CPU share, then one row per control. Target: median < 100 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import workbench as wb  # noqa: E402
from capture_overhead import _cpu_ticks, _TICK  # noqa: E402  (machine-wide CPU ticks, as the other benchmarks)


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def move_times(explorer, control, values) -> list[float]:
    """Seconds from ``control.value = v`` to the explorer showing it, for each v."""
    out = []
    for v in values:
        start = time.perf_counter()
        control.value = v
        explorer.wait()
        out.append(time.perf_counter() - start)
    return out


def cycle(options, n: int) -> list:
    values = [v for _, v in options] if options and isinstance(options[0], tuple) else list(options)
    return [values[(i + 1) % len(values)] for i in range(n)]


def steps(slider, n: int) -> list[int]:
    span = list(range(slider.min, slider.max + 1))
    return [span[(span.index(slider.value) + 1 + i) % len(span)] for i in range(n)]


def python_side(model, moves: int) -> list[tuple[str, list[float]]]:
    from workbench.analyses.lens import lens_statistics
    from workbench.analyses.token_geometry import token_geometry
    from workbench.corpus import paragraphs
    from workbench.studies.extreme_tokens import capture_domains
    from workbench.widgets import (ByteLens, ExtremeTokenExplorer, GeometryExplorer, LensExplorer,
                                   ResidualNormExplorer, TokenizerExplorer)

    texts = [p[:400] for p in paragraphs()[:8]]
    rows = []

    run = wb.capture(model, texts, ["resid_pre"], progress=False)
    ex = ResidualNormExplorer(run)
    rows.append(("residual norms: layer slider", move_times(ex, ex.layer, steps(ex.layer, moves))))
    rows.append(("residual norms: prompt", move_times(ex, ex.prompt, cycle(ex.prompt.options, moves))))

    domains = capture_domains(model, progress=False)
    ex = ExtremeTokenExplorer(domains, pattern_source=lambda s: wb.capture(
        model, str(domains.text.values[s]), ["attn_pattern"], progress=False).attn_pattern.isel(sample=0).values)
    for s in range(domains.sizes["sample"]):  # every prompt's patterns at hand: what is timed is the redraw
        ex.patterns_of(s)
    ex.wait()
    rows.append(("extreme tokens: layer slider", move_times(ex, ex.layer, steps(ex.layer, moves))))
    rows.append(("extreme tokens: head", move_times(ex, ex.head, [(ex.head.value + 1 + i) % (ex.head.max + 1)
                                                                  for i in range(moves)])))
    rows.append(("extreme tokens: prompt", move_times(ex, ex.prompt, cycle(ex.prompt.options, moves))))
    rows.append(("extreme tokens: domain", move_times(ex, ex.domain, cycle(ex.domain.options, moves))))

    one = wb.capture(model, paragraphs()[100][:400], ["resid_post"], progress=False)
    ex = LensExplorer({(model.name, "logit"): lens_statistics(one, model)}, {model.name: model.tokenizer})
    rows.append(("lens: layer slider", move_times(ex, ex.layer, steps(ex.layer, moves))))
    rows.append(("lens: from-token slider", move_times(ex, ex.start, steps(ex.start, moves))))
    rows.append(("lens: colour metric", move_times(ex, ex.metric, cycle(ex.metric.options, moves))))

    geo_run = wb.capture(model, texts, ["resid_pre", "resid_post"], progress=False)
    geometry = token_geometry(geo_run, max_rank=32, progress=False)
    ex = GeometryExplorer(geometry)
    depths = list(ex.depth.options)
    rows.append(("geometry: depth slider", move_times(ex, ex.depth, [depths[(i + 1) % len(depths)] for i in range(moves)])))
    rows.append(("geometry: prompt", move_times(ex, ex.prompt, cycle(ex.prompt.options, moves))))

    ex = TokenizerExplorer({"smollm2-135m": model.tokenizer})
    ex.wait()
    languages = [v for _, v in ex.language.options if v != "(your own text)"]
    rows.append(("tokenizers: language", move_times(ex, ex.language, languages[1:moves + 1])))

    lens = ByteLens(model, text="The function returns a value.", cut=10)
    cuts = list(range(10, 16))
    for c in cuts:  # computed beforehand: the redraw over results at hand is timed
        lens.results_for(model.name, lens.data[:c])
    lens.wait()
    rows.append(("byte lens: cut slider (computed cuts)",
                 move_times(lens, lens.cut, [cuts[(i + 1) % len(cuts)] for i in range(moves)])))
    start = time.perf_counter()
    lens.cut.value = 20
    lens.wait()
    rows.append(("byte lens: a new cut (model work, background)", [time.perf_counter() - start]))
    return rows


NOTEBOOK_CELLS = [
    """import torch
import workbench as wb
from workbench.analyses.lens import lens_statistics
from workbench.corpus import paragraphs
from workbench.studies.extreme_tokens import capture_domains
from workbench.widgets import ExtremeTokenExplorer, LensExplorer, ResidualNormExplorer
torch.set_num_threads(THREADS)
model = wb.load_model("MODEL")
texts = [p[:400] for p in paragraphs()[:8]]""",
    """residual = ResidualNormExplorer(wb.capture(model, texts, ["resid_pre"], progress=False))
residual""",
    """domains = capture_domains(model, probes=["attn_received", "attn_pattern"], progress=False)
sinks = ExtremeTokenExplorer(domains)
sinks""",
    """one = wb.capture(model, paragraphs()[100][:400], ["resid_post"], progress=False)
lens = LensExplorer({(model.name, "logit"): lens_statistics(one, model)}, {model.name: model.tokenizer})
lens""",
]

WATCH_JS = """el => {
    // From the key press to the last change of the figures' drawing (settled: no change for 300 ms).
    window.__wbResult = null;
    let start = null, last = null;
    document.addEventListener('keydown', () => { start = performance.now(); }, {once: true, capture: true});
    const obs = new MutationObserver(() => { if (start !== null) last = performance.now(); });
    for (const p of el.querySelectorAll('.js-plotly-plot'))
        obs.observe(p, {subtree: true, childList: true, attributes: true, characterData: true});
    const poll = () => {
        const now = performance.now();
        if (start !== null && last !== null && now - last > 300) { obs.disconnect(); window.__wbResult = [last - start, true]; }
        else if (start !== null && now - start > 30000) { obs.disconnect(); window.__wbResult = [now - start, false]; }
        else setTimeout(poll, 10);
    };
    poll();
}"""


def browser_side(model_name: str, threads: int, moves: int) -> list[tuple[str, list[float]]]:
    import nbformat
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, jupyter_lab, run_notebook

    if CHROMIUM is None:
        raise SystemExit("no chromium on PATH: `make setup` installs Debian's chromium, or pass --no-browser")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cells = [nbformat.v4.new_code_cell(c.replace("THREADS", str(threads)).replace("MODEL", model_name))
                 for c in NOTEBOOK_CELLS]
        kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=kernel), root / "widgets_benchmark.ipynb")
        with jupyter_lab(root, env={"WORKBENCH_FIGURES": str(root / "figures")}) as (base, token), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            run_notebook(page, base, token, "widgets_benchmark.ipynb")
            page.wait_for_timeout(2000)
            explorers = page.locator(".jp-OutputArea-output", has=page.locator(".widget-hslider"))
            names = ["residual norms", "extreme tokens", "lens"]
            for k in range(explorers.count()):
                explorer = explorers.nth(k)
                explorer.scroll_into_view_if_needed()
                handles = explorer.locator(".widget-hslider .noUi-handle")
                for i in range(handles.count()):
                    times = []
                    handle = handles.nth(i)
                    handle.focus()
                    for _ in range(moves):
                        now, top = (float(handle.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemax"))
                        explorer.evaluate(WATCH_JS)
                        page.keyboard.press("ArrowRight" if now < top else "Home")  # at the end: back to the start
                        page.wait_for_function("() => window.__wbResult !== null", timeout=40_000)
                        ms, ok = page.evaluate("() => window.__wbResult")
                        if not ok:
                            raise SystemExit(f"{names[k]} slider {i}: no redraw within 30 s")
                        times.append(ms / 1000)
                    rows.append((f"browser, {names[k]}: slider {i} (arrow key)", times))
            browser.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernel's too)")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = wb.load_model(args.model)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} thread(s); model {model.name} ({model.n_layers} layers, {model.dtype}; "
          f"4-bit GGUF dequantised)")
    print(f"{'control':58s} {'moves':>5s} {'median ms':>10s} {'p95 ms':>8s}  others' CPU")
    parts = [lambda: python_side(model, args.moves)]
    if not args.no_browser:
        parts.append(lambda: browser_side(args.model, args.threads, args.moves))
    for part in parts:
        busy0, own0, t0 = *_cpu_ticks(), time.perf_counter()
        rows = part()
        busy1, own1, t1 = *_cpu_ticks(), time.perf_counter()
        # in the browser part, "others" includes the JupyterLab server, the kernel and Chromium
        others = max(0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * _TICK * os.cpu_count())
        for name, times in rows:
            ms = [1000 * t for t in times]
            print(f"{name:58s} {len(ms):5d} {statistics.median(ms):10.1f} {p95(ms):8.1f}  {others:.0%}", flush=True)


if __name__ == "__main__":
    main()
