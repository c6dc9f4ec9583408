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

import os
import shutil
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is a test dependency: make setup")

from .browser import (CHROMIUM, NOTEBOOKS, jupyter_lab, move_every_control, overflow, run_notebook,  # noqa: E402
                      stderr_outputs)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make setup installs it)")

WIDTHS = (1280, 1920)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token, root folder) of a JupyterLab server on loopback; stopped after the module."""
    root = tmp_path_factory.mktemp("lab")
    with jupyter_lab(root, env={"WORKBENCH_FIGURES": str(root / "figures")}) as (base, token):
        yield base, token, root


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


@pytest.mark.parametrize("notebook", [p.name for p in NOTEBOOKS])
def test_notebook_in_a_browser(notebook, lab, browser, tmp_path):
    base, token, root = lab
    shutil.copy(next(p for p in NOTEBOOKS if p.name == notebook), root)
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
        try:
            move_every_control(page, explorer, shot, f"explorer{k}")
        except AssertionError as err:  # say what the page said meanwhile
            raise AssertionError(f"{err}; console errors: {console_errors}; explorer's busy line: "
                                 f"{explorer.locator('.widget-html').all_inner_texts()}") from None

    page.set_viewport_size({"width": WIDTHS[1], "height": 1000})
    page.wait_for_timeout(500)
    assert overflow(page) == [], f"at {WIDTHS[1]} px"
    for k in range(explorers.count()):
        shot(f"explorer{k}-wide", explorers.nth(k))
    assert console_errors == []
    page.close()
