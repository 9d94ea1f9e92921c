"""The report in a real browser: opens from file://, no console errors, every chart drawn."""

import pytest
from support.browser import needs_chromium, visit

from servescope.analyzers.report import build_report


@pytest.mark.browser
@needs_chromium
def test_report_renders_in_chromium(hostile_run_dir):
    report = build_report(hostile_run_dir)
    assert report.read_text().count('data-chart-for="') >= 5
    seen = visit(report, screenshot="report.png",
                 selectors={"injected": 'img[src="x"]'},  # the hostile tenant label, had it become markup
                 texts={"shown_as_text": "onerror=alert(1)"})
    assert seen.errors == []
    assert seen.svgs >= seen.plots
    assert seen.dialogs == [] and seen.counts["injected"] == 0 and seen.counts["shown_as_text"] > 0
    assert seen.screenshot.stat().st_size > 10_000
