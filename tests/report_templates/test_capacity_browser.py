"""The capacity report in a real browser: both curves drawn, their axes framing every step and every SLO line."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames, problems

from servescope.analyzers.capacity import CapacityResult, CapacitySettings, StepResult, _figures, to_html
from servescope.report_templates.render import render_page


def _step(rate: float, passed: bool, ttft_p99: float | None, tpot_p99: float | None, *, early_stop: bool = False,
          goodput: float | None = None) -> StepResult:
    return StepResult(
        rate=rate, duration_s=5.0 if early_stop else 20.0, passed=passed, clearly_failed=not passed, early_stop=early_stop,
        req_per_s=rate * 0.97, goodput_req_per_s=goodput if goodput is not None or not passed else rate * 0.95,
        error_rate=0.0, requests=int(rate * 20),
        latencies={"ttft_s.p50": None if ttft_p99 is None else ttft_p99 / 3, "ttft_s.p99": ttft_p99, "tpot_s.p99": tpot_p99,
                   "itl_s.p99": tpot_p99, "e2e_s.p50": 0.9, "e2e_s.p99": 2.5},
        objectives=[], reason="meets every objective" if passed else "ttft_p99 over", run_dir=None,
    )


def _search(slo: str) -> CapacityResult:
    """Grown 1 -> 8, failed at 8 (a probe settled 16), bisected to 5.66; one step has a zero and a missing latency."""
    steps = [
        _step(1.0, True, 0.045, 0.011),
        _step(2.0, True, 0.06, 0.0),  # a zero latency has no place on a log axis
        _step(4.0, True, 0.11, 0.018),
        _step(8.0, False, 2.4, None, goodput=None),  # no TPOT measured, no goodput
        _step(16.0, False, 30.0, 0.5, early_stop=True),  # a probe: left out of the curves
        _step(5.66, True, 0.2, 0.024),
    ]
    return CapacityResult(settings=CapacitySettings(slo=slo), steps=steps, capacity_rate=5.66, lowest_failing_rate=8.0,
                          stop_reason="capacity in [5.66, 8) req/s (within 10%)")


CASES = {
    "near": "ttft_p99=300ms,tpot_p99=40ms",
    "far-thresholds": "ttft_p99=20s,tpot_p99=1ms,error_rate=1%",  # SLO lines well above and below the data
}


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("case", sorted(CASES))
def test_capacity_axes_frame_every_step_and_slo_line(tmp_path: Path, case: str) -> None:
    result = _search(CASES[case])
    page = tmp_path / "capacity.html"
    page.write_text(to_html(result), encoding="utf-8")
    seen = visit(page, screenshot=f"capacity-{case}.png")
    assert seen.errors == [] and seen.dialogs == []
    assert_frames(seen.charts, expected=2)
    latency = next(c for c in seen.charts if c["title"] == "Latency vs offered rate")
    assert latency["axes"]["y"]["type"] == "log"
    slo_lines = [t for t in latency["traces"] if t["name"].startswith("SLO ")]
    assert len(slo_lines) == 2  # the error-rate objective has no latency line
    # The probe at 16 req/s is in the table, not on the curves.
    assert all(16.0 not in t["x"] for c in seen.charts for t in c["traces"])


@pytest.mark.browser
@needs_chromium
def test_a_search_without_latencies_still_frames_its_slo_lines(tmp_path: Path) -> None:
    result = CapacityResult(settings=CapacitySettings(slo="ttft_p99=500ms"), steps=[_step(1.0, False, None, None)],
                            stop_reason="no rate passed within 12 steps")
    page = tmp_path / "capacity.html"
    page.write_text(to_html(result), encoding="utf-8")
    seen = visit(page, screenshot="capacity-no-latency.png")
    assert seen.errors == []
    assert_frames(seen.charts, expected=2)


@pytest.mark.browser
@needs_chromium
def test_the_check_catches_an_slo_label_placed_in_data_units_on_a_log_axis(tmp_path: Path) -> None:
    """A log axis takes annotation positions in log10 units: a label at y=300 (ms) stretches it to 1e300."""
    fig = go.Figure(go.Scatter(x=[1, 2, 4], y=[45, 60, 110], mode="lines+markers"))
    fig.add_hline(y=300, annotation_text="SLO ttft_p99")
    fig.update_layout(yaxis_type="log", title="latency")
    page = tmp_path / "broken.html"
    page.write_text(render_page("capacity.html.j2", r=_search(CASES["near"]), steps=[], figures=[fig.to_plotly_json()]),
                    encoding="utf-8")
    seen = visit(page, screenshot="capacity-broken-control.png")
    found = problems(seen.charts[0])
    assert any("decades beyond its data" in p for p in found), found


def test_latency_range_is_in_log10_units_and_covers_data_and_thresholds() -> None:
    _, latency = _figures(_search(CASES["far-thresholds"]))
    lo, hi = latency.layout.yaxis.range
    assert latency.layout.yaxis.type == "log"
    assert lo <= 0 < 1.0 and hi >= 4.3  # 1 ms (log10 0) and 20 s = 20000 ms (log10 4.30)
    assert hi - lo < 6
    assert not latency.layout.annotations and not latency.layout.shapes
    assert all(y is None or y > 0 for t in latency.data for y in t.y)
