"""The notebooks in JupyterLab in a real browser, as a person uses them.

A JupyterLab server runs on loopback (token-protected, a free port, its own settings and copies of the
notebooks in a temporary folder, stopped at the end); Debian's Chromium, driven by Python Playwright (no
browser download: ``executable_path``), opens each notebook, runs all cells, moves every control of each
explorer and checks, at 1280 and 1920 px window widths, that

- every code cell ran, and no output holds an error or a warning (nothing on stderr);
- the browser console shows no errors;
- each control changes the figure's data (the drawn SVG) within seconds;
- the explorer fits inside the notebook: no figure reaches past the cell area, no horizontal scroll.

Screenshots of each state go to the test's temporary folder; with ``WORKBENCH_SCREENSHOTS=<folder>``
(``make screenshots``) they are also kept there.
"""

from __future__ import annotations

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

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is a test dependency: make setup")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make setup installs it)")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WIDTHS = (1280, 1920)
SETTINGS = {  # JupyterLab user settings for the test server
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},  # every cell in the page
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token, root folder) of a JupyterLab server on loopback; stopped after the module."""
    root = tmp_path_factory.mktemp("lab")
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
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WORKBENCH_FIGURES": str(root / "figures")})
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
        yield base, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Screens:
    """Screenshots into the test's folder, and into $WORKBENCH_SCREENSHOTS when set."""

    def __init__(self, page, folder: Path, name: str):
        self.page, self.folder, self.name = page, folder, name
        self.keep = Path(os.environ["WORKBENCH_SCREENSHOTS"]) if os.environ.get("WORKBENCH_SCREENSHOTS") else None

    def __call__(self, state: str, element=None) -> Path:
        """The whole notebook, or only ``element`` (an explorer's output)."""
        path = self.folder / f"{self.name}-{state}.png"
        if element is not None:
            element.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path), full_page=True)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.keep / path.name)
        return path


def run_notebook(page, base: str, token: str, name: str, timeout_s: float = 600) -> None:
    """Open ``name`` in JupyterLab, run all cells, wait until every code cell has run."""
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")  # a workspace of its own
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    try:  # JupyterLab may ask which kernel to start
        page.get_by_role("button", name="Select", exact=True).click(timeout=5_000)
    except playwright.TimeoutError:
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


def changed(output, before: list[str], timeout_s: float = 10.0) -> bool:
    end = time.time() + timeout_s
    while time.time() < end:
        if figure_signatures(output) != before:
            return True
        time.sleep(0.1)
    return False


def move_every_control(page, explorer, shot, name: str) -> None:
    """Each slider one step right (keyboard) and each dropdown to another option: every move must change a figure."""
    handles = explorer.locator(".widget-hslider .noUi-handle")
    for i in range(handles.count()):
        before = figure_signatures(explorer)
        handles.nth(i).focus()
        page.keyboard.press("ArrowRight")
        assert changed(explorer, before), f"{name}: moving slider {i} changed no figure"
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


@pytest.mark.parametrize("notebook", ["00_quickstart.ipynb", "04_geometry_and_updates.ipynb", "05_tokenizers.ipynb"])
def test_notebook_in_a_browser(notebook, lab, browser, tmp_path):
    base, token, root = lab
    shutil.copy(NOTEBOOKS / notebook, root)
    page = browser.new_page(viewport={"width": WIDTHS[0], "height": 1000})
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    shot = Screens(page, tmp_path, Path(notebook).stem)
    run_notebook(page, base, token, notebook)
    shot("ran")
    assert stderr_outputs(page) == [], "a cell printed an error or warning"
    assert overflow(page) == [], f"at {WIDTHS[0]} px"

    explorers = page.locator(".jp-OutputArea-output", has=page.locator(".widget-hslider, .widget-dropdown"))
    assert explorers.count() >= 1, "no explorer in the notebook"
    for k in range(explorers.count()):
        explorer = explorers.nth(k)
        assert explorer.locator(".js-plotly-plot").count() >= 1
        explorer.scroll_into_view_if_needed()
        move_every_control(page, explorer, shot, f"explorer{k}")

    page.set_viewport_size({"width": WIDTHS[1], "height": 1000})
    page.wait_for_timeout(500)
    assert overflow(page) == [], f"at {WIDTHS[1]} px"
    for k in range(explorers.count()):
        shot(f"explorer{k}-wide", explorers.nth(k))
    assert console_errors == []
    page.close()
