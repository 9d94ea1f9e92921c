"""Capacity search: the highest request rate whose run still meets the SLO.

The search grows the rate geometrically (start, x2, x4, ...) until a step
fails, then bisects between the best passing and the lowest failing rate
until they are within `tolerance` of each other. Each step is a real run at a
fixed rate, judged by `analyzers.summarize` against the SLOs: a step passes
when every objective holds, errors stay under `max_error_rate`, and it served
at least `min_served_fraction` of the offered rate.

Early stop: while growing, a rate that was never tried is first run as a short
probe (`probe_fraction` of a step). A probe that fails clearly (an objective
over `clear_fail_factor` x its threshold, or most requests failing) settles
that step as failed without paying for the full step, which at an overloaded
rate is the slowest part of the search (its queue must drain).

The search (`search_capacity`) takes any `probe(rate, duration_s) -> StepResult`,
so its logic is testable on a known curve; the runner that sends the load is
`servescope.harness.orchestration.capacity.run_capacity`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from servescope.errors import UsageError
from servescope.units import format_duration

LATENCY_KEYS: tuple[tuple[str, str], ...] = (
    ("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p99"), ("itl_s", "p99"), ("e2e_s", "p50"), ("e2e_s", "p99"),
)


class CapacityError(UsageError):
    """The search cannot run as configured (message says which setting and why)."""


@dataclass(frozen=True)
class CapacitySettings:
    """How the search walks the rate axis. Rates are requests per second."""

    slo: str
    start_rate: float = 1.0
    max_rate: float = 256.0
    step_duration_s: float = 20.0
    growth: float = 2.0
    tolerance: float = 0.1  # stop when lowest failing / highest passing <= 1 + tolerance
    max_steps: int = 12
    max_error_rate: float = 0.01
    probe_fraction: float = 0.25
    clear_fail_factor: float = 2.0
    # A step serving less than this share of its offered rate fails. Lenient on purpose: a short
    # Poisson step's served rate is noisy and biased low (requests in flight at the end are not counted).
    min_served_fraction: float = 0.6

    def __post_init__(self) -> None:
        from servescope.slo import parse_slos

        if not parse_slos(self.slo):
            raise CapacityError("--slo: a capacity search needs at least one objective, e.g. ttft_p99=500ms")
        if not (0 < self.start_rate <= self.max_rate) or not math.isfinite(self.max_rate):
            raise CapacityError(f"rates: need 0 < start rate ({self.start_rate}) <= --max-rate ({self.max_rate})")
        if self.step_duration_s <= 0:
            raise CapacityError(f"--step-duration must be positive, got {self.step_duration_s}s")
        if self.growth <= 1:
            raise CapacityError(f"growth must exceed 1 (each step multiplies the rate), got {self.growth}")
        if not 0 < self.tolerance < 1:
            raise CapacityError(f"--tolerance must be a fraction in (0, 1), e.g. 0.1, got {self.tolerance}")
        if self.max_steps < 2:
            raise CapacityError(f"--max-steps must be at least 2, got {self.max_steps}")
        if not 0 <= self.max_error_rate < 1 or not 0 <= self.probe_fraction < 1 or self.clear_fail_factor <= 1:
            raise CapacityError("max_error_rate and probe_fraction must lie in [0, 1), clear_fail_factor above 1")


@dataclass
class StepResult:
    """One rate tried: what was measured and whether it met the SLO."""

    rate: float
    duration_s: float
    passed: bool
    clearly_failed: bool
    early_stop: bool  # settled by the short probe alone
    req_per_s: float | None
    goodput_req_per_s: float | None
    error_rate: float
    requests: int
    latencies: dict[str, float | None]  # e.g. {"ttft_s.p99": 0.21}
    objectives: list[dict[str, Any]]
    reason: str
    run_dir: str | None = None


@dataclass
class CapacityResult:
    settings: CapacitySettings
    steps: list[StepResult] = field(default_factory=list)
    capacity_rate: float | None = None  # highest rate that passed
    lowest_failing_rate: float | None = None
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_step(summary: dict[str, Any], rate: float, duration_s: float, settings: CapacitySettings,
               *, run_dir: str | None = None, early_stop: bool = False) -> StepResult:
    """A StepResult from a run's summary (analyzers.summarize with the search's SLOs)."""
    overall = summary["overall"]
    objectives = list(summary.get("slo", {}).get("objectives", []))
    error_rate = float(overall.get("error_rate") or 0.0)
    missed = [o for o in objectives if not o["ok"]]
    far = [o for o in missed if o["value"] is None or o["value"] > settings.clear_fail_factor * o["threshold"]]
    reasons = [f"{o['name']} {_fmt(o['value'], o['metric'])} > {_fmt(o['threshold'], o['metric'])}" for o in missed]
    if error_rate > settings.max_error_rate:
        reasons.append(f"error rate {error_rate:.1%} > {settings.max_error_rate:.1%}")
    if overall.get("ok", 0) == 0:
        reasons.append("no request succeeded")
    served = overall.get("req_per_s") or 0.0
    # Latency alone can pass while the server (or the client) silently falls behind
    # the offered rate in a short step: the backlog never shows up as TTFT.
    if served < settings.min_served_fraction * rate:
        reasons.append(f"served {served:.2f} req/s of {rate:.3g} offered (< {settings.min_served_fraction:.0%})")
    latencies = {f"{m}.{s}": overall["metrics"].get(m, {}).get(s) for m, s in LATENCY_KEYS}
    return StepResult(
        rate=rate, duration_s=duration_s, passed=not reasons, early_stop=early_stop,
        clearly_failed=bool(far) or error_rate > 0.5 or overall.get("ok", 0) == 0 or served < 0.3 * rate,
        req_per_s=overall.get("req_per_s"), goodput_req_per_s=overall.get("goodput_req_per_s"),
        error_rate=error_rate, requests=int(overall.get("requests", 0)), latencies=latencies,
        objectives=objectives, reason="; ".join(reasons) or "meets every objective", run_dir=run_dir,
    )


Probe = Callable[[float, float], StepResult]


def search_capacity(probe: Probe, settings: CapacitySettings, on_step: Callable[[StepResult], None] | None = None) -> CapacityResult:
    """Grow, then bisect. `probe(rate, duration_s)` runs one step and judges it."""
    result = CapacityResult(settings=settings)

    def step(rate: float, short_first: bool) -> StepResult:
        if short_first and settings.probe_fraction > 0:
            short = probe(rate, max(2.0, settings.step_duration_s * settings.probe_fraction))
            if short.clearly_failed:
                short = replace(short, early_stop=True, passed=False)
                _record(result, short, on_step)
                return short
        full = probe(rate, settings.step_duration_s)
        _record(result, full, on_step)
        return full

    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    rate = settings.start_rate
    while len(result.steps) < settings.max_steps:
        outcome = step(rate, short_first=lo is not None)
        if outcome.passed:
            lo = rate
            if rate >= settings.max_rate:
                result.stop_reason = f"met the SLO at --max-rate {settings.max_rate:g} req/s; capacity may be higher"
                break
            rate = min(rate * settings.growth, settings.max_rate)
            continue
        hi = rate
        if lo is None:
            if rate <= settings.start_rate / settings.growth ** 3:
                result.stop_reason = "the SLO fails even at a very low rate: fix latency first, or relax the SLO"
                break
            rate /= settings.growth  # the start rate already fails: walk down
            continue
        break
    while lo is not None and hi is not None and hi / lo > 1 + settings.tolerance:
        if len(result.steps) >= settings.max_steps:
            result.stop_reason = f"stopped after --max-steps {settings.max_steps}; capacity lies in [{lo:g}, {hi:g}) req/s"
            break
        mid = math.sqrt(lo * hi)  # geometric: rates span orders of magnitude
        if step(mid, short_first=False).passed:
            lo = mid
        else:
            hi = mid
    result.capacity_rate, result.lowest_failing_rate = lo, hi
    if not result.stop_reason:
        if lo is not None and hi is not None:
            result.stop_reason = f"capacity in [{lo:.3g}, {hi:.3g}) req/s (within {settings.tolerance:.0%})"
        elif lo is None:
            result.stop_reason = result.stop_reason or f"no rate passed within {settings.max_steps} steps"
        else:
            result.stop_reason = f"every rate tried passed, up to {lo:g} req/s (--max-steps reached)"
    return result


def _record(result: CapacityResult, step: StepResult, on_step: Callable[[StepResult], None] | None) -> None:
    result.steps.append(step)
    if on_step is not None:
        on_step(step)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    from servescope.slo import RATE_METRICS

    return f"{value:.2%}" if metric in RATE_METRICS else format_duration(value, digits=0)


def write_capacity(result: CapacityResult, out: Path) -> tuple[Path, Path]:
    """capacity.json (the data) and capacity.html (the curves) in `out`."""
    from servescope.rundir.jsonio import write_json_atomic

    json_path, html_path = out / "capacity.json", out / "capacity.html"
    write_json_atomic(json_path, result.to_dict())
    html_path.write_text(to_html(result), encoding="utf-8")
    return json_path, html_path


# ---------------------------------------------------------------- report

def to_html(result: CapacityResult) -> str:
    """The self-contained capacity report: verdict, goodput and latency vs rate, every step."""
    from servescope.report_templates.render import render_page

    steps = sorted(result.steps, key=lambda s: (s.rate, s.duration_s))
    figures = [fig.to_plotly_json() for fig in _figures(result)]
    return render_page("capacity.html.j2", r=result, steps=steps, figures=figures)


def _figures(result: CapacityResult) -> list[Any]:
    """Goodput (and throughput) vs offered rate; latency percentiles vs rate with the SLO lines."""
    import plotly.graph_objects as go

    from servescope.slo import RATE_METRICS, parse_slos

    full = sorted((s for s in result.steps if not s.early_stop), key=lambda s: s.rate)
    rates = [s.rate for s in full]
    colors = ["#1e8449" if s.passed else "#c0392b" for s in full]
    good = go.Figure()
    top = max(rates + [1.0])
    good.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="offered = served", line=dict(dash="dot", color="#999")))
    good.add_trace(go.Scatter(x=rates, y=[s.req_per_s for s in full], mode="lines+markers", name="served req/s"))
    good.add_trace(go.Scatter(x=rates, y=[s.goodput_req_per_s for s in full], mode="lines+markers", name="goodput req/s (met every SLO)",
                              marker=dict(size=11, color=colors)))
    if result.capacity_rate:
        good.add_vline(x=result.capacity_rate, line_color="#1e8449", annotation_text=f"capacity {result.capacity_rate:.3g} req/s")
    good.update_layout(title="Goodput vs offered rate", xaxis_title="offered rate (req/s)", yaxis_title="req/s",
                       template="plotly_white", height=420)
    # The latency axis is log: plotly takes a log axis's range (and annotation positions on it) in log10
    # units, while trace points and shapes stay in data units. So the SLO lines are traces, and the range is
    # set in log10 units from every point and threshold drawn; a non-positive latency has no place on it.
    lat = go.Figure()
    drawn: list[float] = []
    for key in ("ttft_s.p50", "ttft_s.p99", "tpot_s.p99", "e2e_s.p99"):
        ys = [_positive_ms(s.latencies.get(key)) for s in full]
        if any(y is not None for y in ys):
            drawn += [y for y in ys if y is not None]
            lat.add_trace(go.Scatter(x=rates, y=ys, mode="lines+markers", name=key.replace("_s.", " ")))
    span = [min(rates), max(rates)] if rates else [0.0, 1.0]
    for slo in parse_slos(result.settings.slo):
        threshold = _positive_ms(slo.threshold) if slo.metric not in RATE_METRICS else None
        if threshold is not None:
            drawn.append(threshold)
            lat.add_trace(go.Scatter(x=span, y=[threshold, threshold], mode="lines", name=f"SLO {slo.name} {_fmt(slo.threshold, slo.metric)}",
                                     line=dict(dash="dash", color="#c0392b", width=1.5), hoverinfo="name"))
    yaxis: dict[str, Any] = {"type": "log"}
    if drawn:
        lo, hi = math.log10(min(drawn)), math.log10(max(drawn))
        pad = max(0.1, 0.05 * (hi - lo))
        yaxis["range"] = [lo - pad, hi + pad]
    lat.update_layout(title="Latency vs offered rate", xaxis_title="offered rate (req/s)", yaxis_title="ms (log)",
                      yaxis=yaxis, template="plotly_white", height=420)
    return [good, lat]


def _positive_ms(seconds: float | None) -> float | None:
    """Milliseconds for a log axis: None for a missing, non-finite or non-positive value."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds * 1000
