"""Writing a Comparison out: markdown for a CI job summary, JUnit XML for test dashboards, HTML for people.

All three render the same `Comparison`; none computes anything. JUnit is
built with xml.etree (one <testcase> per gated metric, a <failure> on a
regression) so CI systems that understand test reports show a red gate by name.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from servescope.analyzers.compare import (
    VERDICT_FEW,
    VERDICT_IMPROVED,
    VERDICT_REGRESSED,
    Comparison,
    MetricResult,
)
from servescope.rundir.jsonio import dumps
from servescope.units import format_duration

_ICONS = {VERDICT_REGRESSED: "🔴", VERDICT_IMPROVED: "🟢", VERDICT_FEW: "⚪"}


# ---------------------------------------------------------------- formatting

def format_value(value: float | None, unit: str) -> str:
    """A figure with its unit, latencies in ms (what people read SLOs in)."""
    if value is None:
        return "–"
    if unit == "s":
        return format_duration(value)
    if unit == "fraction":
        return f"{value * 100:.2f}%"
    return f"{value:.2f} {unit}"


def format_change(m: MetricResult) -> str:
    """`+12.3% [+8.1%, +16.0%]` (relative) or `+1.20 pt [...]` (error rate, absolute points)."""
    if m.change is None:
        return "–"

    def one(x: float | None) -> str:
        if x is None:
            return "?"
        return f"{x * 100:+.1f}%" if m.relative else f"{x * 100:+.2f} pt"

    return f"{one(m.change)} [{one(m.ci_low)}, {one(m.ci_high)}]"


def format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


HEADLINE_CHANGES = 4


def headline(c: Comparison) -> str:
    """The gate verdict, then the largest significant changes, gated or not.

    Each metric family (TTFT, TPOT, ITL, E2E, each throughput, the error rate)
    is named once, by its largest significant change; families are ranked by the
    relative size of that change, so a +20% TTFT shift is named whichever
    statistics the gates watch.
    """
    failures = c.gate_failures
    if failures:
        def beyond(m) -> str:  # the error rate is judged in points, every other metric relative to its base
            if m.name == "error_rate":
                return f"{m.name} (by more than {c.settings.error_margin * 100:.1f} points)"
            return f"{m.name} (by more than {c.settings.threshold:.0%})"

        verdict = f"REGRESSION: {', '.join(beyond(m) for m in failures)} regressed"
    else:
        verdict = f"OK: no gated metric regressed ({', '.join(c.settings.gates)})"
    changes = largest_changes(c)
    if not changes:
        return f"{verdict}; no significant change"
    more = len(changes) - HEADLINE_CHANGES
    named = ", ".join(
        f"{m.name} {m.verdict} {_short_change(m)}{' (gate)' if m.gated else ''}" for m in changes[:HEADLINE_CHANGES]
    )
    return f"{verdict}; largest significant changes: {named}{f' and {more} more' if more > 0 else ''}"


def largest_changes(c: Comparison) -> list[MetricResult]:
    """One metric per family (its largest significant change), largest relative change first."""
    best: dict[str, MetricResult] = {}
    for m in c.overall:
        if m.verdict not in (VERDICT_REGRESSED, VERDICT_IMPROVED):
            continue
        family = m.name.split("_")[0] if m.unit == "s" else m.name
        if family not in best or relative_size(m) > relative_size(best[family]):
            best[family] = m
    return sorted(best.values(), key=lambda m: (-relative_size(m), not m.gated, m.name))


def relative_size(m: MetricResult) -> float:
    """|change| as a fraction of the baseline; for an absolute metric (error rate) from its two values."""
    if m.change is None:
        return 0.0
    if m.relative:
        return abs(m.change)
    if m.base:
        return abs(m.change) / abs(m.base)
    return math.inf  # from zero to something: larger than any relative change


def _short_change(m: MetricResult) -> str:
    if m.change is None:
        return "–"
    return f"{m.change * 100:+.1f}%" if m.relative else f"{m.change * 100:+.2f} pt"


# ---------------------------------------------------------------- markdown

def to_markdown(c: Comparison, *, max_slice_rows: int = 30) -> str:
    """A GitHub-flavoured markdown summary: gates first, then every metric, then slices that moved."""
    s = c.settings
    lines = [
        f"## servescope compare: {'❌' if c.exit_code else '✅'} {headline(c)}",
        "",
        f"Baseline `{c.base_path}` ({len(c.base_runs)} run{'s' * (len(c.base_runs) != 1)}) vs "
        f"candidate `{c.cand_path}` ({len(c.cand_runs)} run{'s' * (len(c.cand_runs) != 1)}); "
        f"threshold {s.threshold:.0%}, alpha {s.alpha}, {s.n_boot} bootstrap replicates.",
        "",
        "| metric | gate | baseline | candidate | change [CI] | p | n (base/cand) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ordered = sorted(c.overall, key=lambda m: (not m.gated, 0))
    for m in ordered:
        lines.append(
            f"| {m.label} | {'gate' if m.gated else ''} | {format_value(m.base, m.unit)} | "
            f"{format_value(m.cand, m.unit)} | {format_change(m)} | {format_p(m.p_value)} | "
            f"{m.n_base}/{m.n_cand} | {_ICONS.get(m.verdict, '')} {m.verdict} |"
        )
    moved = [(sl, m) for sl in c.slices for m in sl.metrics if m.verdict in (VERDICT_REGRESSED, VERDICT_IMPROVED)]
    if moved:
        lines += ["", "### Slices that moved", "",
                  "| slice | metric | baseline | candidate | change [CI] | verdict |", "| --- | --- | --- | --- | --- | --- |"]
        for sl, m in moved[:max_slice_rows]:
            lines.append(
                f"| {sl.dimension}={sl.value} | {m.label} | {format_value(m.base, m.unit)} | "
                f"{format_value(m.cand, m.unit)} | {format_change(m)} | {_ICONS.get(m.verdict, '')} {m.verdict} |"
            )
        if len(moved) > max_slice_rows:
            lines.append(f"| … {len(moved) - max_slice_rows} more in the HTML report | | | | | |")
    if c.notes:
        lines += [""] + [f"> note: {n}" for n in c.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- junit

def to_junit(c: Comparison) -> str:
    """JUnit XML: one test case per gated metric, a <failure> when it regressed."""
    gated = [m for m in c.overall if m.gated]
    suite = ET.Element(
        "testsuite", name="servescope.compare", tests=str(len(gated)),
        failures=str(len(c.gate_failures)), errors="0", skipped="0",
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (("baseline", c.base_path), ("candidate", c.cand_path),
                       ("threshold", str(c.settings.threshold)), ("alpha", str(c.settings.alpha))):
        ET.SubElement(props, "property", name=key, value=value)
    for m in gated:
        case = ET.SubElement(suite, "testcase", classname="servescope.compare", name=m.name)
        detail = (
            f"{m.label}: baseline {format_value(m.base, m.unit)}, candidate {format_value(m.cand, m.unit)}, "
            f"change {format_change(m)}, p={format_p(m.p_value)}, n={m.n_base}/{m.n_cand}: {m.verdict}"
        )
        if m.failed_gate:
            failure = ET.SubElement(case, "failure", message=f"{m.name} regressed: {format_change(m)}", type="regression")
            failure.text = detail
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


# ---------------------------------------------------------------- html

def to_html(c: Comparison) -> str:
    """The self-contained comparison report (plotly inlined once, opens offline)."""
    from servescope.report_templates.render import render_page

    return render_page(
        "compare.html.j2", c=c, headline=headline(c), forest=_forest_figure(c).to_plotly_json(),
        value=format_value, change=format_change, pvalue=format_p, comparison=c.to_dict(),
    )


def _forest_figure(c: Comparison):
    """Relative change of each metric with its confidence interval; the threshold band shaded."""
    import plotly.graph_objects as go

    rows = [m for m in c.overall if m.change is not None and m.relative][::-1]
    colors = {VERDICT_REGRESSED: "#c0392b", VERDICT_IMPROVED: "#1e8449"}
    fig = go.Figure()
    fig.add_vrect(x0=-c.settings.threshold * 100, x1=c.settings.threshold * 100, fillcolor="#888", opacity=0.12, line_width=0)
    fig.add_trace(go.Scatter(
        x=[m.change * 100 for m in rows], y=[m.label + (" (gate)" if m.gated else "") for m in rows], mode="markers",
        marker=dict(size=9, color=[colors.get(m.verdict, "#555") for m in rows]),
        error_x=dict(
            type="data", symmetric=False,
            array=[((m.ci_high if m.ci_high is not None else m.change) - m.change) * 100 for m in rows],
            arrayminus=[(m.change - (m.ci_low if m.ci_low is not None else m.change)) * 100 for m in rows],
        ),
        hovertext=[f"{m.label}: {format_change(m)} ({m.verdict})" for m in rows], hoverinfo="text",
    ))
    fig.add_vline(x=0, line_color="#333", line_width=1)
    fig.update_layout(
        height=120 + 22 * len(rows), margin=dict(l=10, r=10, t=30, b=40),
        xaxis_title="change vs baseline (%), with confidence interval; shaded: within threshold",
        showlegend=False, template="plotly_white",
    )
    return fig


def write_outputs(c: Comparison, *, html: Path | None, markdown: Path | None, junit: Path | None,
                  json_path: Path | None = None) -> list[Path]:
    """Write whichever outputs were asked for; returns the paths written."""
    written = []
    for path, render in ((html, to_html), (markdown, to_markdown), (junit, to_junit),
                         (json_path, lambda x: dumps(x.to_dict()) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(c), encoding="utf-8")
            written.append(path)
    return written
