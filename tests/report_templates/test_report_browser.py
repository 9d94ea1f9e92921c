"""The report in a real browser: opens from file://, no console errors, every chart drawn."""

import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames

from servescope.analyzers.report import build_report
from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run


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
    assert_frames(seen.charts, expected=report.read_text().count('data-chart-for="'))


@pytest.mark.browser
@needs_chromium
def test_report_axes_frame_every_chart(tmp_path):
    """A loaded run with an SLO: every time series and every finding's chart frames what it draws."""
    run = write_synthetic_run(tmp_path / "run", SyntheticSpec(requests=3000, rate=120, seed=7, error_rate=0.03, warmup=50))
    from servescope.slo import parse_slos

    report = build_report(run, parse_slos("ttft_p99=150ms,tpot_p99=20ms"))
    expected = report.read_text().count('data-chart-for="')
    assert expected >= 6
    seen = visit(report, screenshot="report-axes.png")
    assert seen.errors == []
    assert_frames(seen.charts, expected=expected)
