"""The lab report in a real browser: both sides' finding charts drawn, each framing what it shows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames

from servescope.analyzers.lab import LabResult, judge_side, write_lab_report
from servescope.analyzers.report import build_report
from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run

LAB = SimpleNamespace(name="errors", rule="errors", question="Do 5xx bursts show up as the errors finding?",
                      experiment_label="5% of requests fail", control_label="no failure")


@pytest.mark.browser
@needs_chromium
def test_lab_report_axes_frame_every_chart(tmp_path: Path) -> None:
    sides = {}
    for side, error_rate in (("experiment", 0.05), ("control", 0.0)):
        run_dir = write_synthetic_run(tmp_path / side, SyntheticSpec(requests=1500, rate=80, seed=11, error_rate=error_rate))
        build_report(run_dir)  # the per-side report the lab page links to
        label = LAB.experiment_label if side == "experiment" else LAB.control_label
        sides[side] = judge_side(run_dir, label, "complete")
    result = LabResult(LAB, tmp_path, sides["experiment"], sides["control"])
    page = write_lab_report(result)
    expected = page.read_text(encoding="utf-8").count('data-chart-for="')
    assert result.fired_in_experiment and expected >= 1
    seen = visit(page, screenshot="lab.png")
    assert seen.errors == [] and seen.dialogs == []
    assert_frames(seen.charts, expected=expected)
