"""Open a servescope HTML report in headless Debian Chromium and say what happened.

Shared by every browser test: a report must load from file:// with no console
error, no network request (it is self-contained) and every chart drawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.chart_axes import CHART_FRAMES_JS

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "_artifacts"

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium at /usr/bin/chromium")


@dataclass
class PageVisit:
    errors: list[str] = field(default_factory=list)  # console errors, page errors, network requests
    dialogs: list[str] = field(default_factory=list)
    plots: int = 0
    svgs: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # extra selectors / texts asked for
    charts: list[dict] = field(default_factory=list)  # each drawn chart's axes, traces, shapes (support.chart_axes)
    screenshot: Path | None = None


def visit(report: Path, *, screenshot: str, selectors: dict[str, str] | None = None,
          texts: dict[str, str] | None = None) -> PageVisit:
    """Load `report`, wait until all its charts are drawn, count things, save a full-page screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = report.read_text(encoding="utf-8").count('data-chart-for="')
    out = PageVisit()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: out.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: out.errors.append(str(e)))
            page.on("dialog", lambda d: (out.dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: out.errors.append(f"network request: {r.url}")
                    if not r.url.startswith(("file:", "data:")) else None)
            page.goto(report.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {expected}", timeout=15_000)
            out.plots = page.locator(".js-plotly-plot").count()
            out.svgs = page.locator(".main-svg").count()
            out.charts = page.evaluate(CHART_FRAMES_JS)
            for name, selector in (selectors or {}).items():
                out.counts[name] = page.locator(selector).count()
            for name, text in (texts or {}).items():
                out.counts[name] = page.get_by_text(text, exact=False).count()
            ARTIFACTS.mkdir(exist_ok=True)
            out.screenshot = ARTIFACTS / screenshot
            page.screenshot(path=str(out.screenshot), full_page=True)
        finally:
            browser.close()
    assert out.plots == expected, f"{out.plots} of {expected} charts drawn"
    return out
