"""A two-node run with a lagging node, a lost worker and coordinated omission, in a real browser."""

import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames
from support.cluster_runs import LOST, lost_worker_sim, ray_meta

from servescope.analyzers.report import build_report
from servescope.rundir.writer import write_run_dir


@pytest.mark.browser
@needs_chromium
def test_per_node_report_renders_and_frames_its_charts(make_sim, tmp_path):
    sim = lost_worker_sim(make_sim, lag_b=0.030)
    out = write_run_dir(tmp_path / "run", {"status": "complete", **ray_meta(lost=LOST)}, sim.rows)
    report = build_report(out)
    html = report.read_text()
    assert "Per node" in html and "coordinated omission" in html and "workers lost" in html
    assert 'id="chart-client_bound"' in html
    expected = html.count('data-chart-for="')
    seen = visit(report, screenshot="report-nodes.png")
    assert seen.errors == []
    assert_frames(seen.charts, expected=expected)
