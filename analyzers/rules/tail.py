"""Rule `tail`: which slices are over-represented among the slowest (p99) requests.

For TTFT and E2E, the top 1% (at least 10 requests) is compared with the
middle half (p25-p75). A label value is reported when its share of the tail is
at least twice its share of the middle, and Fisher's exact test says that is
unlikely to be chance (p < 0.001): a run with a few slow requests of every
kind stays silent.

E2E grows with output length on every server, so the E2E tail is never judged
by output bucket: a tail of long outputs is how serving works, not a fault.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import pct
from servescope.analyzers.slices import DIMENSIONS, labels

MIN_REQUESTS = 200
MIN_TAIL = 10
MIN_RATIO = 2.0
MAX_P = 1e-3
TAIL_DIMENSIONS = ("prompt_bucket", "output_bucket", "tenant", "prefix_group", "cache", "spec", "phase", "time_window")
METRICS = (("ttft_s", "TTFT"), ("e2e_s", "E2E"))
EXPLAINED_BY = {"e2e_s": {"output_bucket"}}  # dimensions that set the metric by construction


def tail(ctx: DiagnosisContext) -> Finding | None:
    ok = ctx.ok
    if len(ok) < MIN_REQUESTS:
        return None
    found = []
    for metric, metric_name in METRICS:
        values = ok[metric].to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        if finite.sum() < MIN_REQUESTS:
            continue
        sub, vals = ok[finite], values[finite]
        tail_n = max(MIN_TAIL, int(np.ceil(0.01 * len(vals))))
        cut = np.partition(vals, len(vals) - tail_n)[len(vals) - tail_n]
        in_tail = vals >= cut
        q25, q75 = np.quantile(vals, [0.25, 0.75])
        in_mid = (vals >= q25) & (vals <= q75)
        for dim in TAIL_DIMENSIONS:
            if dim in EXPLAINED_BY.get(metric, ()):
                continue
            found.extend(_over_represented(sub, dim, in_tail, in_mid, metric, metric_name, cut))
    if not found:
        return None
    found.sort(key=lambda s: -s["ratio"])
    top = found[0]
    return Finding(
        rule="tail",
        severity="low",
        title=f"The slowest {top['metric_name']} requests are mostly {DIMENSIONS[top['dimension']][0].lower()} = {top['value'].strip()}",
        summary=(
            f"{pct(top['tail_share'])} of the p99 {top['metric_name']} requests have "
            f"{top['dimension']} = {top['value'].strip()}, against {pct(top['mid_share'])} of the median ones "
            f"({_ratio_text(top)}, Fisher p = {top['p_value']:.1e})."
            + (f" {len(found) - 1} other slice(s) are over-represented too." if len(found) > 1 else "")
        ),
        evidence={"over_represented": found[:10], "n": top["tail_n"], "effect": top["ratio"]},
        slices=[{"dimension": s["dimension"], "value": s["value"], "metric": s["metric"]} for s in found[:10]],
        suggestion="Look at the finding for the cause behind this slice (convoy, cache misses, queueing), or give it its own SLO.",
        chart=_chart(found[:6]),
    )


def _chart(entries: list[dict]) -> dict:
    names = [f"{e['metric_name']}: {e['dimension']}={e['value'].strip()}" for e in entries]
    return charts.figure(
        [charts.bar(names, [100 * e["tail_share"] for e in entries], "share of the p99 requests (%)"),
         charts.bar(names, [100 * e["mid_share"] for e in entries], "share of the median requests (%)")],
        "Slices over-represented among the slowest requests", "slice", "% of requests", barmode="group",
    )


def _over_represented(frame: pd.DataFrame, dim: str, in_tail: np.ndarray, in_mid: np.ndarray, metric: str, metric_name: str, cut: float) -> list[dict]:
    keys = labels(frame, dim).to_numpy(dtype=object)
    present = np.array([k is not None for k in keys])
    if len({k for k in keys[present]}) < 2:
        return []
    out = []
    tail_total, mid_total = int((in_tail & present).sum()), int((in_mid & present).sum())
    if tail_total < MIN_TAIL or mid_total == 0:
        return []
    for value in sorted({k for k in keys[present]}, key=str):
        is_value = keys == value
        a, b = int((in_tail & is_value).sum()), int((in_mid & is_value).sum())
        tail_share, mid_share = a / tail_total, b / mid_total
        if tail_share < 0.3 or tail_share < MIN_RATIO * mid_share:
            continue
        p_value = fisher_exact([[a, tail_total - a], [b, mid_total - b]], alternative="greater")[1]
        if p_value < MAX_P:
            out.append({
                "metric": metric, "metric_name": metric_name, "dimension": dim, "value": str(value),
                "tail_share": tail_share, "mid_share": mid_share,
                "ratio": tail_share / max(mid_share, 0.5 / mid_total),  # zero in the middle: half a request
                "p_value": float(p_value), "tail_n": tail_total, "tail_threshold_s": float(cut),
            })
    return out


def _ratio_text(entry: dict) -> str:
    if entry["mid_share"] == 0:
        return "absent from the median ones"
    return f"{entry['ratio']:.1f}x over-represented"
