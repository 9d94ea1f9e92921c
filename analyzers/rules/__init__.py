"""Diagnosis rules: one small function per rule, each returning a Finding or None.

A rule that does not apply stays silent (returns None) rather than saying
"nothing found". The order of RULES is the tie-break order of the ranking.
When `client_bound` fires, every other finding is marked uncertain: the
latencies it rests on include the load generator's own delay.

Where two findings compete for the same slow requests, `analyzers.competing`
lowers the one that explains less.
"""

from __future__ import annotations

from typing import Callable

from servescope.analyzers.competing import weigh_competing
from servescope.analyzers.context import DiagnosisContext, build_context
from servescope.analyzers.findings import Finding, rank_findings
from servescope.analyzers.rules.client_bound import client_bound
from servescope.analyzers.rules.convoy import convoy
from servescope.analyzers.rules.errors import errors
from servescope.analyzers.rules.flow_tail import flow_tail
from servescope.analyzers.rules.kv_transfer import kv_transfer
from servescope.analyzers.rules.preemption import preemption
from servescope.analyzers.rules.prefix_cache import prefix_cache
from servescope.analyzers.rules.queueing import queueing
from servescope.analyzers.rules.rate_limit import rate_limit
from servescope.analyzers.rules.slice_outlier import slice_outlier
from servescope.analyzers.rules.spec_decode import spec_decode
from servescope.analyzers.rules.stall import stall
from servescope.analyzers.rules.tail import tail
from servescope.rundir.reader import RunData

Rule = Callable[[DiagnosisContext], "Finding | None"]

RULES: dict[str, Rule] = {
    "client_bound": client_bound,
    "errors": errors,
    "rate_limit": rate_limit,
    "stall": stall,
    "queueing": queueing,
    "convoy": convoy,
    "preemption": preemption,
    "prefix_cache": prefix_cache,
    "spec_decode": spec_decode,
    "kv_transfer": kv_transfer,
    "slice_outlier": slice_outlier,
    "tail": tail,
    "flow_tail": flow_tail,
}
RULE_IDS: tuple[str, ...] = tuple(RULES)


def run_rules(ctx: DiagnosisContext, only: tuple[str, ...] | None = None) -> list[Finding]:
    """Every rule (or the rules named in `only`) on `ctx`, ranked; competing causes weighed."""
    findings = []
    for rule_id, rule in RULES.items():
        if only is not None and rule_id not in only:
            continue
        finding = rule(ctx)
        if finding is None:
            continue
        if finding.rule != rule_id:
            raise ValueError(f"rule {rule_id!r} returned a finding labelled {finding.rule!r}: a finding carries its rule's id")
        findings.append(finding)
    if any(f.rule == "client_bound" for f in findings):
        for f in findings:
            if f.rule != "client_bound":
                f.uncertain = True
                f.summary += " (Less certain: the load generator was itself a bottleneck in this run.)"
    weigh_competing(ctx, findings)
    return rank_findings(findings, RULE_IDS)


def diagnose(run: RunData) -> list[Finding]:
    """Every finding that fired on this run, ranked by severity."""
    return run_rules(build_context(run))
