"""The comparison report in a real browser: same page frame as the diagnosis report, forest plot drawn."""

from pathlib import Path

import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames
from support.synthetic_runs import write_run

from servescope.analyzers.compare import compare_runs
from servescope.analyzers.regression_report import to_html


@pytest.mark.browser
@needs_chromium
def test_compare_report_renders_in_chromium(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", seed=1)
    slow = write_run(tmp_path / "slow", seed=3, slowdown=1.4)
    page = tmp_path / "compare.html"
    page.write_text(to_html(compare_runs(base, slow)), encoding="utf-8")
    seen = visit(page, screenshot="compare.png", selectors={"verdict_fail": "#verdict .badge.fail", "regressed_rows": "tr.regressed"})
    assert seen.errors == [] and seen.dialogs == []
    assert seen.plots == 1
    assert seen.counts["verdict_fail"] == 1 and seen.counts["regressed_rows"] >= 1
    assert_frames(seen.charts, expected=1)


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("slowdown", [1.0, 0.7, 2.5])
def test_forest_axes_frame_every_interval_and_the_threshold_band(tmp_path: Path, slowdown: float) -> None:
    """No change, an improvement, a large regression: each change, its interval and the band lie inside the x range."""
    base = write_run(tmp_path / "base", seed=1)
    cand = write_run(tmp_path / "cand", seed=3, slowdown=slowdown)
    page = tmp_path / "compare.html"
    page.write_text(to_html(compare_runs(base, cand)), encoding="utf-8")
    seen = visit(page, screenshot=f"compare-{slowdown:g}.png")
    assert seen.errors == []
    assert_frames(seen.charts, expected=1)
    forest = seen.charts[0]
    assert forest["traces"][0]["x_err"]  # the confidence intervals were read and judged
    band = forest["shapes"][0]
    assert sorted(band["x"]) == [-5.0, 5.0]
