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


@dataclass
class LabResult:
    lab: Any  # the lab's definition: .name, .rule, .question, .experiment_label, .control_label
    out: Path
    experiment: LabSideResult
    control: LabSideResult
    report: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fired_in_experiment(self) -> bool:
        return self.experiment.fired(self.lab.rule) is not None

    @property
    def silent_in_control(self) -> bool:
        return self.control.fired(self.lab.rule) is None

    @property
    def ok(self) -> bool:
        return self.fired_in_experiment and self.silent_in_control


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
