"""Rule `prefix_cache`: how the prefix cache served the run, and hits that were expected but missed.

A request "expects" a hit when an earlier request of its prefix group had
already received its first token (so the shared prefix was computed and
could be cached) before this one was sent. Expected hits with no cached tokens
point at eviction (KV pressure), a prefix shorter than one KV block, or a
load balancer spreading a group over replicas. A run where the cache worked
gets an `info` finding with the TTFT of hits against misses; a run with no
cache activity and no prefix groups stays silent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.metrics import describe
from servescope.analyzers.rules.common import ms, pct

MIN_EXPECTED = 5
MIN_HIT_RATE = 0.10  # below this (and with no prefix groups) hits are incidental block matches
MISSED_MEDIUM, MISSED_HIGH = 0.2, 0.5


def expected_hits(frame: pd.DataFrame) -> np.ndarray:
    """Per row: an earlier request of the same prefix group got its first token before this one was sent."""
    out = np.zeros(len(frame), dtype=bool)
    groups = frame["prefix_group"].to_numpy(dtype=object)
    has_group = pd.notna(groups)
    if not has_group.any():
        return out
    sent = frame["sent_at"].to_numpy(dtype=np.float64)
    first = frame["first_token_at"].to_numpy(dtype=np.float64)
    positions = np.flatnonzero(has_group)
    for _, idx in pd.Series(positions).groupby(groups[has_group]):
        rows = idx.to_numpy()
        prefilled = np.sort(first[rows][np.isfinite(first[rows])])
        if prefilled.size:
            out[rows] = prefilled[0] < sent[rows]
    return out


def prefix_cache(ctx: DiagnosisContext) -> Finding | None:
    frame = ctx.frame
    cached = frame["cached_tokens"].to_numpy(dtype=np.float64)
    if np.isnan(cached).all():
        return None
    ok = (frame["status"] == "ok").to_numpy()
    known = ~np.isnan(cached)
    hit = known & (cached > 0)
    expected = expected_hits(frame) & known & ok
    missed = expected & ~hit
    if expected.sum() < MIN_EXPECTED and hit[known].mean() < MIN_HIT_RATE:
        return None
    ttft = frame["ttft_s"].to_numpy(dtype=np.float64)
    ttft_hit, ttft_miss = describe(ttft[hit & ok], with_ci=False), describe(ttft[known & ~hit & ok], with_ci=False)
    hit_rate = hit[known].mean()
    missed_share = missed.sum() / expected.sum() if expected.sum() else 0.0
    groups = _group_table(frame, hit, expected, missed, known)
    evidence = {
        "hit_rate": float(hit_rate),
        "token_hit_rate": float(np.nansum(cached[known]) / max(np.nansum(frame["prompt_tokens"].to_numpy(dtype=np.float64)[known]), 1)),
        "ttft_hit": {k: ttft_hit[k] for k in ("n", "p50", "p90", "p99")},
        "ttft_miss": {k: ttft_miss[k] for k in ("n", "p50", "p90", "p99")},
        "expected_hits": int(expected.sum()),
        "expected_hits_missed": int(missed.sum()),
        "missed_share": float(missed_share),
        "groups": groups[:20],
    }
    if ctx.metrics.has("prefix_queries"):
        queries = ctx.metrics.counter_increase("prefix_queries")
        if queries > 0:
            evidence["server_hit_rate"] = ctx.metrics.counter_increase("prefix_hits") / queries
    elif ctx.metrics.has("prefix_hit_rate"):
        evidence["server_hit_rate"] = float(ctx.metrics.gauge("prefix_hit_rate").mean())
    chart = charts.figure(
        [charts.bar([g["prefix_group"] for g in groups[:30]], [g["hit_rate"] * 100 for g in groups[:30]], "hit rate (%)")],
        "Prefix cache hit rate by prefix group", "prefix group", "hit rate (%)",
    ) if groups else None
    speedup = (ttft_miss["p50"] / ttft_hit["p50"]) if ttft_hit["p50"] and ttft_miss["p50"] else None
    hit_text = (
        f"Cache hits had a median TTFT of {ms(ttft_hit['p50'])} (n={ttft_hit['n']}) against {ms(ttft_miss['p50'])} "
        f"for misses (n={ttft_miss['n']})." if speedup else f"{int(hit.sum())} requests hit the cache."
    )
    evidence["n"] = int(min(ttft_hit["n"] or 0, ttft_miss["n"] or 0))
    evidence["effect"] = speedup  # how much slower a miss starts than a hit
    if expected.sum() >= MIN_EXPECTED and missed_share >= MISSED_MEDIUM:
        severity = "high" if missed_share >= MISSED_HIGH else "medium"
        title = f"{int(missed.sum())} of {int(expected.sum())} expected prefix-cache hits missed ({pct(missed_share)})"
        summary = (
            f"Requests whose prefix group had already been prefilled still got no cached tokens in "
            f"{pct(missed_share)} of cases. {hit_text}"
        )
        suggestion = (
            "Misses after the prefix was computed mean it was evicted (KV cache too small for the working set: "
            "see the preemption/KV usage evidence), the shared prefix is shorter than one KV block, or requests "
            "of a group went to different replicas (use prefix-aware routing)."
        )
    else:
        severity = "info"
        title = f"Prefix cache hit rate {pct(hit_rate)}" + (f"; hits start {speedup:.1f}x faster than misses" if speedup and speedup > 1 else "")
        summary = hit_text + f" {pct(hit_rate)} of requests reused cached prefix tokens."
        suggestion = "Nothing to fix; keep shared prefixes at the start of the prompt and identical byte for byte."
    return Finding(
        rule="prefix_cache", severity=severity, title=title, summary=summary, evidence=evidence,
        slices=[{"dimension": "prefix_group", "value": g["prefix_group"], "missed": g["missed"]} for g in groups if g["missed"]][:10],
        suggestion=suggestion, chart=chart,
        _affected=frame["request_id"].to_numpy(dtype=object)[missed] if severity != "info" else None,
    )


def _group_table(frame: pd.DataFrame, hit: np.ndarray, expected: np.ndarray, missed: np.ndarray, known: np.ndarray) -> list[dict]:
    groups = frame["prefix_group"].to_numpy(dtype=object)
    present = pd.notna(groups) & known
    if not present.any():
        return []
    table = pd.DataFrame({"g": groups[present], "hit": hit[present], "expected": expected[present], "missed": missed[present]})
    agg = table.groupby("g").agg(n=("hit", "size"), hit_rate=("hit", "mean"), expected=("expected", "sum"), missed=("missed", "sum"))
    agg = agg.sort_values(["missed", "n"], ascending=False)
    return [
        {"prefix_group": str(g), "n": int(r.n), "hit_rate": float(r.hit_rate), "expected": int(r.expected), "missed": int(r.missed)}
        for g, r in agg.iterrows()
    ]
