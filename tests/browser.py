"""JupyterLab on loopback and Chromium driven by Playwright: what the browser tests and
``benchmarks/widgets.py`` share. Needs Debian's chromium (``executable_path``; no browser download)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SETTINGS = {  # JupyterLab user settings for the server
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},  # every cell in the page
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(root: Path, env: dict | None = None):
    """(base URL, token) of a JupyterLab server on loopback serving ``root``; stopped on exit."""
    root = Path(root)
    settings = root / ".settings"
    for name, value in SETTINGS.items():
        path = settings / name  # <settings>/@jupyterlab/<extension>/<plugin>.jupyterlab-settings
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={settings}",
         f"--LabApp.workspaces_dir={root / '.workspaces'}", *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("JupyterLab exited: " + (root / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not answer within 2 minutes")
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_notebook(page, base: str, token: str, name: str, timeout_s: float = 600) -> None:
    """Open ``name`` in JupyterLab, run all cells, wait until every code cell has run."""
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")  # a workspace of its own
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    try:  # JupyterLab may ask which kernel to start
        page.get_by_role("button", name="Select", exact=True).click(timeout=5_000)
    except PlaywrightTimeout:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(
        """() => {
            const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
            const errors = document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
            return errors.length > 0 || (p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t)));
        }""", timeout=timeout_s * 1000, polling=1000)


def stderr_outputs(page) -> list[str]:
    return page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()


def overflow(page) -> list[str]:
    """What reaches past the notebook's cell area, or scrolls sideways inside it."""
    return page.evaluate(
        """() => {
            const out = [];
            const area = document.querySelector('.jp-Notebook').getBoundingClientRect();
            for (const plot of document.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')) {
                const r = plot.getBoundingClientRect();
                if (r.right > area.right + 1 || r.left < area.left - 1)
                    out.push(`figure ${Math.round(r.left)}..${Math.round(r.right)} outside ${Math.round(area.left)}..${Math.round(area.right)}`);
            }
            for (const o of document.querySelectorAll('.jp-OutputArea-output')) {
                if (o.scrollWidth > o.clientWidth + 1) {
                    const cell = o.closest('.jp-Cell');
                    const prompt = cell ? cell.querySelector('.jp-InputArea-prompt').textContent.trim() : '?';
                    out.push(`output of cell ${prompt} (${o.dataset.mimeType}) scrolls sideways: ${o.scrollWidth} > ${o.clientWidth}`);
                }
            }
            return out;
        }""")


def figure_signatures(output) -> list[str]:
    """The drawn data of each figure in an output (its SVG layers), to tell whether a control changed them."""
    return output.evaluate(
        "el => [...el.querySelectorAll('.js-plotly-plot')].map(p => [...p.querySelectorAll('.main-svg')]"
        ".map(s => s.innerHTML).join(''))")


def changed(output, before: list[str], timeout_s: float = 30.0) -> bool:
    """Whether the figures' drawing changes within ``timeout_s`` (work that needs the model runs in the background)."""
    end = time.time() + timeout_s
    while time.time() < end:
        if figure_signatures(output) != before:
            return True
        time.sleep(0.1)
    return False


def undrawn_figures(output) -> list[str]:
    """The figures of an output that show no data yet: plotly's placeholder, or a plot that drew no trace
    (SVG traces, heatmap images, tables; WebGL canvases for 3-D scenes)."""
    return output.evaluate(
        "el => [...el.querySelectorAll('.js-plotly-plot')].map((p, i) => [i, (p.data || []).length, "
        "p.querySelectorAll('.main-svg .trace, .main-svg image, .main-svg .table-control-view, .gl-container canvas').length])"
        ".filter(([i, n, drawn]) => n === 0 || drawn === 0).map(([i, n, drawn]) => `figure ${i}: ${n} traces, "
        "${drawn} drawn`)")


def wait_until_drawn(output, name: str, timeout_s: float = 120.0) -> None:
    """Wait until every figure of ``output`` shows its data. A busy page (a loaded CI machine) can take many
    seconds to load plotly's widget code and draw a FigureWidget after the kernel has finished; a control
    moved before that compares against an empty figure. Fails, saying which figure, if one never draws."""
    end = time.time() + timeout_s
    while (missing := undrawn_figures(output)) and time.time() < end:
        time.sleep(0.25)
    if missing:
        raise AssertionError(f"{name}: after {timeout_s:.0f} s these figures still show no data: {missing}")


def slider_readouts(explorer) -> list[str]:
    return explorer.locator(".widget-hslider .widget-readout").all_inner_texts()


def move_every_control(page, explorer, shot, name: str) -> None:
    """Each slider one step right (keyboard) and each dropdown to another option: every move must change a figure."""
    wait_until_drawn(explorer, name)
    handles = explorer.locator(".widget-hslider .noUi-handle")
    for i in range(handles.count()):
        before, readouts = figure_signatures(explorer), slider_readouts(explorer)
        for _ in range(2):  # a key press can be lost while the page is still settling after the run: press again
            handles.nth(i).focus()
            page.keyboard.press("ArrowRight")
            if changed(explorer, before, timeout_s=20):
                break
        else:
            raise AssertionError(f"{name}: moving slider {i} (twice) changed no figure (slider readouts "
                                 f"{readouts} -> {slider_readouts(explorer)}; figures without data: "
                                 f"{undrawn_figures(explorer)})")
        shot(f"{name}-slider{i}", explorer)
    selects = explorer.locator(".widget-dropdown select")
    for i in range(selects.count()):
        select = selects.nth(i)
        n, current = select.evaluate("s => [s.options.length, s.selectedIndex]")
        if n < 2:
            continue
        before = figure_signatures(explorer)
        select.select_option(index=(current + 1) % n)
        assert changed(explorer, before), f"{name}: choosing another option in dropdown {i} changed no figure"
        shot(f"{name}-dropdown{i}", explorer)


