"""Rule `preemption`: KV-cache pressure forces the server to evict running requests and recompute them.

Needs the server's preemption counter (vLLM `num_preemptions`, SGLang
`num_retracted_reqs`). The requests that were in flight during a scrape
interval in which the counter rose are "hit"; their largest inter-token gap
and E2E are compared with the requests never in flight during a preemption.
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import effect_ratio, median, ms, ratio

HIGH_PER_REQUEST = 0.05  # preemptions per measured request
KV_FULL = 0.90


def preemption(ctx: DiagnosisContext) -> Finding | None:
    total = ctx.metrics.counter_total("preemptions")
    if len(total) < 2:
        return None
    frame = ctx.frame
    sent, end = frame["sent_at"].to_numpy(dtype=np.float64), frame["end_at"].to_numpy(dtype=np.float64)
    t0, t1 = np.nanmin(sent) if len(frame) else 0.0, np.nanmax(end) if len(frame) else 0.0
    count = ctx.metrics.counter_increase("preemptions", None, None)
    if count <= 0:
        return None
    times = total.index.to_numpy(dtype=np.float64)
    rises = np.flatnonzero(np.diff(total.to_numpy()) > 0)
    hit = np.zeros(len(frame), dtype=bool)
    for i in rises:  # scrape intervals with a preemption: few, so a loop over them is cheap
        hit |= (sent <= times[i + 1]) & (end >= times[i])
    kv = ctx.metrics.gauge("kv_usage")
    kv_max = float(kv.max()) if len(kv) else None
    ok = (frame["status"] == "ok").to_numpy()
    stall = frame["itl_max_s"].to_numpy(dtype=np.float64)
    e2e = frame["e2e_s"].to_numpy(dtype=np.float64)
    per_request = count / max(len(frame), 1)
    severity = "high" if per_request >= HIGH_PER_REQUEST and (kv_max is None or kv_max >= KV_FULL) else "medium" if per_request >= 0.01 else "low"
    evidence = {
        "preemptions": count,
        "preemptions_per_request": per_request,
        "kv_usage_max": kv_max,
        "requests_hit": int((hit & ok).sum()),
        "itl_max_p50_hit_s": median(stall[hit & ok]),
        "itl_max_p50_not_hit_s": median(stall[~hit & ok]),
        "e2e_p50_hit_s": median(e2e[hit & ok]),
        "e2e_p50_not_hit_s": median(e2e[~hit & ok]),
        "window_s": [float(t0), float(t1)],
    }
    evidence["n"] = int(min((hit & ok).sum(), (~hit & ok).sum()))
    evidence["effect"] = effect_ratio(ratio(evidence["e2e_p50_hit_s"], evidence["e2e_p50_not_hit_s"]),
                                      ratio(evidence["itl_max_p50_hit_s"], evidence["itl_max_p50_not_hit_s"]))
    rate = ctx.metrics.counter_rate("preemptions")
    traces = [charts.line(rate.index.to_numpy(), rate.to_numpy(), "preemptions / s")]
    if len(kv):
        traces.append(charts.line(kv.index.to_numpy(), kv.to_numpy() * 100, "KV cache usage (%)", yaxis="y2"))
    kv_text = f" while KV cache usage peaked at {kv_max * 100:.0f}%" if kv_max is not None else ""
    return Finding(
        rule="preemption",
        severity=severity,
        title=f"{count:.0f} preemptions: KV cache pressure evicts running requests",
        summary=(
            f"The server preempted {count:.0f} times ({per_request:.2f} per request){kv_text}. "
            f"The {evidence['requests_hit']} requests in flight at those moments had a median worst token gap of "
            f"{ms(evidence['itl_max_p50_hit_s'])} against {ms(evidence['itl_max_p50_not_hit_s'])} for the others, "
            f"and median E2E {ms(evidence['e2e_p50_hit_s'])} against {ms(evidence['e2e_p50_not_hit_s'])}."
        ),
        evidence=evidence,
        slices=[{"dimension": "in flight during a preemption", "value": "yes", "n": evidence["requests_hit"]}],
        suggestion=(
            "Give the KV cache more room (raise gpu-memory-utilization / --num-kv-blocks, shorter max context) or admit "
            "fewer sequences at once (--max-num-seqs); preempted requests recompute their whole prefix."
        ),
        chart=charts.figure(traces, "Preemptions and KV cache usage", "time in run (s)", "preemptions / s",
                            yaxis2={"title": {"text": "KV usage (%)"}, "overlaying": "y", "side": "right", "range": [0, 105]}),
        _affected=frame["request_id"].to_numpy(dtype=object)[hit & ok],
    )
