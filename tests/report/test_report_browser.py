"""The report in a real browser: opens from file://, no console errors, every chart drawn."""

import os
from pathlib import Path

import pytest

from analyzers.report import build_report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "_artifacts"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium at /usr/bin/chromium")
def test_report_renders_in_chromium(hostile_run_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    report = build_report(hostile_run_dir)
    expected_charts = report.read_text().count('data-chart-for="')
    assert expected_charts >= 5
    errors: list[str] = []
    dialogs: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: errors.append(f"network request: {r.url}") if not r.url.startswith(("file:", "data:")) else None)
            page.goto(report.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {expected_charts}", timeout=15_000)
            plots = page.locator(".js-plotly-plot").count()
            svgs = page.locator(".main-svg").count()
            injected = page.locator('img[src="x"]').count()  # the hostile tenant label, had it become markup
            shown_as_text = page.get_by_text("onerror=alert(1)", exact=False).count()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert plots == expected_charts and svgs >= plots
    assert dialogs == [] and injected == 0 and shown_as_text > 0
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
