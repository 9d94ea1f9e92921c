"""Judging a lab: did the expected finding fire for the experiment and stay silent for the control?

DIR/experiment/ and DIR/control/ are ordinary run directories (each with its
own report.html); DIR/report.html puts the two side by side. The labs
themselves, and the runs, are `servescope.harness.orchestration.lab`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servescope.analyzers.context import build_context
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules import run_rules
from servescope.analyzers.summary import summarize
from servescope.rundir.reader import load_run


@dataclass
class LabSideResult:
    label: str
    run_dir: Path
    status: str
    summary: dict[str, Any]
    findings: list[Finding]

    def fired(self, rule: str) -> Finding | None:
        return next((f for f in self.findings if f.rule == rule), None)


@dataclass(frozen=True)
class LabCheck:
    """A lab's claim beyond its rule (e.g. "TTFT is steadier in the experiment"), judged on the two runs."""

    claim: str
    passed: bool
    detail: str


@dataclass
class LabResult:
    lab: Any  # the lab's definition: .name, .rule, .question, .experiment_label, .control_label
    out: Path
    experiment: LabSideResult
    control: LabSideResult
    report: Path | None = None
    notes: list[str] = field(default_factory=list)
    checks: list[LabCheck] = field(default_factory=list)  # the lab's own claims (`lab_checks`)

    @property
    def fired_in_experiment(self) -> bool:
        return self.experiment.fired(self.lab.rule) is not None

    @property
    def silent_in_control(self) -> bool:
        return self.control.fired(self.lab.rule) is None

    @property
    def ok(self) -> bool:
        return self.fired_in_experiment and self.silent_in_control and all(c.passed for c in self.checks)


def judge_side(run_dir: Path, label: str, status: str) -> LabSideResult:
    """One side of a lab, read back from its run directory: summary and findings."""
    run = load_run(run_dir)
    return LabSideResult(label=label, run_dir=run_dir, status=status, summary=summarize(run),
                         findings=run_rules(build_context(run)))


def write_lab_report(result: LabResult) -> Path:
    from servescope.report_templates.render import render_page

    path = result.out / "report.html"
    path.write_text(render_page("lab.html.j2", result=result, lab=result.lab), encoding="utf-8")
    return path


def _metric(side: LabSideResult, name: str, stat: str) -> float | None:
    value = ((side.summary.get("overall") or {}).get("metrics") or {}).get(name, {}).get(stat)
    return float(value) if value is not None else None


SHORT_OUTPUT_TOKENS = 8  # requests with few tokens to spread the gap after the first one over


def _first_gap_figures(run_dir: Path) -> tuple[float | None, float | None]:
    """(median over requests of the gap after the first token over the median of the later gaps, where a
    disaggregated request waits for its KV; TPOT p50 of the requests with at most SHORT_OUTPUT_TOKENS tokens)."""
    import numpy as np

    requests = load_run(run_dir).requests
    measured = requests[(requests["status"] == "ok") & (requests["phase"] != "warmup")]
    ratios = [g[0] / np.median(g[1:]) for g in (np.asarray(x, dtype=np.float64) for x in measured["itl_s"]
                                                 if x is not None and len(x) >= 3) if np.median(g[1:]) > 0]
    short = measured.loc[measured["output_tokens"] <= SHORT_OUTPUT_TOKENS, "tpot_s"].dropna()
    return (float(np.median(ratios)) if len(ratios) >= 10 else None,
            float(short.median()) if len(short) else None)


def pd_checks(result: LabResult) -> list[LabCheck]:
    """Disaggregation's trade-off: TTFT spread narrower than one colocated engine's, and streams that stall
    after their first token while their KV moves (which the TPOT of short outputs pays for)."""
    exp, ctl = result.experiment, result.control
    spread = {}
    for side in (exp, ctl):
        p50, p99 = _metric(side, "ttft_s", "p50"), _metric(side, "ttft_s", "p99")
        spread[side.label] = (p99 / p50, p50, p99) if p50 and p99 is not None else None
    e, c = spread[exp.label], spread[ctl.label]
    checks = [LabCheck(
        "TTFT is steadier in the experiment (p99 / p50)", e is not None and c is not None and e[0] < c[0],
        f"TTFT p99/p50 {e[0]:.2f} ({e[1] * 1000:.0f} / {e[2] * 1000:.0f} ms) disaggregated against {c[0]:.2f} "
        f"({c[1] * 1000:.0f} / {c[2] * 1000:.0f} ms) colocated" if e and c else "TTFT not measured")]
    (er, es), (cr, cs) = _first_gap_figures(exp.run_dir), _first_gap_figures(ctl.run_dir)
    short = (f"; TPOT p50 of outputs of at most {SHORT_OUTPUT_TOKENS} tokens {es * 1000:.0f} ms against "
             f"{cs * 1000:.0f} ms" if es is not None and cs is not None else "")
    checks.append(LabCheck(
        "streams stall after the first token in the experiment, waiting for their KV (the TPOT of short outputs pays)",
        er is not None and cr is not None and er > cr,
        f"gap after the first token / later gaps, median per request: {er:.2f} disaggregated against {cr:.2f} "
        f"colocated{short}" if er is not None and cr is not None else "too few requests with three or more gaps"))
    return checks


LAB_CHECKS = {"pd": pd_checks}


def lab_checks(result: LabResult) -> list[LabCheck]:
    """The claims of `result.lab` beyond its rule (none for most labs)."""
    judge = LAB_CHECKS.get(result.lab.name)
    return judge(result) if judge is not None else []
