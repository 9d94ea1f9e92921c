"""The comparison report in a real browser: same page frame as the diagnosis report, forest plot drawn."""

from pathlib import Path

import pytest
from support.browser import needs_chromium, visit
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
