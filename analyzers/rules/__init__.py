"""Diagnosis rules: one small function per rule, each returning a Finding or None.

A rule that does not apply stays silent (returns None) rather than saying
"nothing found". The order of RULES is the tie-break order of the ranking.
When `client_bound` fires, every other finding is marked uncertain: the
latencies it rests on include the load generator's own delay.

Competing causes: two findings at medium or above that both name the requests
they slowed (`Finding._affected`) and claim mostly the same slow requests (the
slowest SLOW_SHARE by E2E; their common claim is at least COMPETE_OVERLAP of
the weaker one's) are told apart by the share of those requests' excess E2E
(over the median) that each explains: the excess of the latency part its
cause adds to (EXPLAINS: TTFT, decode time or E2E) in the requests it claims. The one that explains less drops one severity level and says so;
each finding drops at most once, against the one that explains the most.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from servescope.analyzers.context import DiagnosisContext, build_context
from servescope.analyzers.findings import Finding, demote, rank_findings
from servescope.analyzers.rules.common import pct
from servescope.analyzers.rules.client_bound import client_bound
from servescope.analyzers.rules.convoy import convoy
from servescope.analyzers.rules.errors import errors
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
    "slice_outlier": slice_outlier,
    "tail": tail,
}
RULE_IDS: tuple[str, ...] = tuple(RULES)
SLOW_SHARE = 0.05  # the slow requests: this share of the ok requests, slowest by E2E
MINOR_SHARE = 0.1  # explaining under a tenth of the stronger finding's share: lowered to low
COMPETE_OVERLAP = 0.5
# the latency part each rule's cause adds to (its share is that part's excess over the median); others: e2e
EXPLAINS = {"queueing": "ttft", "convoy": "ttft", "prefix_cache": "ttft", "preemption": "decode", "spec_decode": "decode"}


def run_rules(ctx: DiagnosisContext) -> list[Finding]:
    findings = []
    for rule_id, rule in RULES.items():
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
    _weigh_competing(ctx, findings)
    return rank_findings(findings, RULE_IDS)


def _excess(ctx: DiagnosisContext) -> dict[str, dict]:
    """For the slow requests, by request_id: how far each latency part exceeds its median (s, never negative)."""
    ok = ctx.ok
    e2e = ok["e2e_s"].to_numpy(dtype=np.float64)
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    finite = np.isfinite(e2e)
    if not finite.any():
        return {}
    count = max(1, int(np.ceil(SLOW_SHARE * finite.sum())))
    slow = np.argsort(np.where(finite, -e2e, np.inf), kind="stable")[:count]
    decode = e2e - ttft
    parts = {"e2e": e2e, "ttft": ttft, "decode": decode}
    excess = {k: np.nan_to_num(np.maximum(v[slow] - np.nanmedian(v), 0.0)) for k, v in parts.items()}
    ids = ok["request_id"].to_numpy(dtype=object)[slow]
    return {k: dict(zip(ids, v)) for k, v in excess.items()}


def _weigh_competing(ctx: DiagnosisContext, findings: list[Finding]) -> None:
    contenders = [f for f in findings if f.severity in ("high", "medium") and f._affected is not None and f.rule != "client_bound"]
    if len(contenders) < 2:
        return
    excess = _excess(ctx)
    total = sum(excess.get("e2e", {}).values())
    if not total:
        return
    slow = set(excess["e2e"])
    claims = {id(f): slow.intersection(f._affected) for f in contenders}
    share = {id(f): sum(excess[EXPLAINS.get(f.rule, "e2e")][r] for r in claims[id(f)]) / total for f in contenders}
    contenders.sort(key=lambda f: -share[id(f)])  # stable: among equals, the registry's order
    demoted: set[int] = set()
    for i, strong in enumerate(contenders):
        if id(strong) in demoted:
            continue
        for weak in contenders[i + 1:]:
            if id(weak) in demoted or share[id(weak)] >= share[id(strong)]:
                continue
            common = len(claims[id(weak)] & claims[id(strong)])
            if not claims[id(weak)] or common < COMPETE_OVERLAP * len(claims[id(weak)]):
                continue  # different slow requests: two causes, both stand
            # A finding that explains a small fraction of what the other does is a side effect of it.
            minor = share[id(weak)] < MINOR_SHARE * share[id(strong)]
            weak.severity = "low" if minor else demote(weak.severity)
            weak.evidence["explained_by"] = {"rule": strong.rule, "explained_share": share[id(strong)],
                                             "own_explained_share": share[id(weak)], "slow_requests": len(slow)}
            weak.summary += (
                f" `{strong.rule}` explains more of the slow requests: of the excess E2E of the slowest "
                f"{pct(SLOW_SHARE)}, it accounts for {pct(share[id(strong)])} and this finding for "
                f"{pct(share[id(weak)])}, so this finding was lowered to {weak.severity}."
            )
            demoted.add(id(weak))


def diagnose(run: RunData) -> list[Finding]:
    """Every finding that fired on this run, ranked by severity."""
    return run_rules(build_context(run))
