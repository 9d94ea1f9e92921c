"""Diagnosis rules: one small function per rule, each returning a Finding or None.

A rule that does not apply stays silent (returns None) rather than saying
"nothing found". The order of RULES is the tie-break order of the ranking.
When `client_bound` fires, every other finding is marked uncertain: the
latencies it rests on include the load generator's own delay.
"""

from __future__ import annotations

from typing import Callable

from analyzers.context import DiagnosisContext, build_context
from analyzers.findings import Finding, rank_findings
from analyzers.rules.client_bound import client_bound
from analyzers.rules.convoy import convoy
from analyzers.rules.errors import errors
from analyzers.rules.prefix_cache import prefix_cache
from analyzers.rules.preemption import preemption
from analyzers.rules.queueing import queueing
from analyzers.rules.spec_decode import spec_decode
from analyzers.rules.tail import tail
from analyzers.rundata import RunData

Rule = Callable[[DiagnosisContext], "Finding | None"]

RULES: dict[str, Rule] = {
    "client_bound": client_bound,
    "errors": errors,
    "queueing": queueing,
    "convoy": convoy,
    "preemption": preemption,
    "prefix_cache": prefix_cache,
    "spec_decode": spec_decode,
    "tail": tail,
}


def run_rules(ctx: DiagnosisContext) -> list[Finding]:
    findings = [f for rule in RULES.values() if (f := rule(ctx)) is not None]
    if any(f.rule == "client_bound" for f in findings):
        for f in findings:
            if f.rule != "client_bound":
                f.uncertain = True
                f.summary += " (Less certain: the load generator was itself a bottleneck in this run.)"
    return rank_findings(findings)


def diagnose(run: RunData) -> list[Finding]:
    """Every finding that fired on this run, ranked by severity."""
    return run_rules(build_context(run))
