"""Competing causes: which of two findings explains more of the slow requests.

Two findings at medium or above that both name the requests they slowed
(`Finding._affected`) and claim mostly the same slow requests (the slowest
SLOW_SHARE by E2E; their common claim is at least COMPETE_OVERLAP of the
weaker one's) are told apart by the share of those requests' excess latency
(over the median) that each explains: the excess of the part its cause adds to
(EXPLAINS: TTFT, decode time or E2E) in the requests it claims. The one that
explains less drops one severity level, or to low when it explains under
MINOR_SHARE of the other's share, and says so; each finding drops at most once,
against the one that explains the most.
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding, demote
from servescope.analyzers.rules.common import pct

SLOW_SHARE = 0.05  # the slow requests: this share of the ok requests, slowest by E2E
MINOR_SHARE = 0.1  # explaining under a tenth of the stronger finding's share: lowered to low
COMPETE_OVERLAP = 0.5
# the latency part each rule's cause adds to (its share is that part's excess over the median); others: e2e
EXPLAINS = {"queueing": "ttft", "convoy": "ttft", "prefix_cache": "ttft", "preemption": "decode", "spec_decode": "decode"}


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


def weigh_competing(ctx: DiagnosisContext, findings: list[Finding]) -> None:
    """Lower, in place, each finding another one explains the slow requests better than."""
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
