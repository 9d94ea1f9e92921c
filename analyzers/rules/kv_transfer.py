"""Rule `kv_transfer`: in disaggregated serving, the KV transfer between the pools became a bottleneck.

A disaggregated server streams the first token from its prefill pool, then
moves the request's KV blocks to a decode pool, which continues. Whatever the
transfer costs shows up after the first token: as the gap between the first
and second tokens (the handoff gap), in TPOT, and as decode capacity that
idles while transfers are on their way. The rule fires (medium or high) when

- the per-request transfer time (`kv_transfer_s`, the engine's usage
  extension) is a material share of TTFT: the handoff stalls a stream for a
  time comparable to the wait for its first token; or
- the handoff gap is typically several times the request's later gaps:
  decode steps stall waiting for transfers; or
- the decode pool's loop spent a material share of its time with nothing to
  run but transfers on their way (`servescope:kv_transfer_wait_seconds`).

It stays silent for colocated serving (no request carries a transfer) and
when the transfers are cheap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.metrics import describe
from servescope.analyzers.pools import pool_metrics
from servescope.analyzers.rules.common import ms, pct, share_effect

MIN_REQUESTS = 10
SHARE_MEDIUM, SHARE_HIGH = 0.2, 0.5  # median transfer over median TTFT
GAP_MEDIUM, GAP_HIGH = 2.0, 4.0  # median handoff gap over the same request's median later gap
WAIT_MEDIUM, WAIT_HIGH = 0.1, 0.3  # decode loop's share of time waiting for transfers
STALLED_GAP = 2.0  # a request whose handoff gap exceeds this many of its later gaps stalled at the handoff


def handoff_gaps(ctx: DiagnosisContext, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of run.requests in `rows`: the first inter-token gap and the median of the later ones (NaN
    where a request has fewer than three gaps)."""
    run = ctx.run
    lengths = np.asarray(run.itl_lengths, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = np.asarray(run.itl_values, dtype=np.float64)
    first = np.full(len(rows), np.nan)
    later = np.full(len(rows), np.nan)
    enough = np.flatnonzero(lengths[rows] >= 3)  # positions in `rows`
    if enough.size:
        starts, counts = offsets[rows[enough]] + 1, lengths[rows[enough]] - 1
        owner = np.repeat(np.arange(enough.size), counts)
        index = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
        first[enough] = values[offsets[rows[enough]]]
        later[enough] = pd.Series(values[index]).groupby(owner).median().to_numpy()
    return first, later


def _server_evidence(ctx: DiagnosisContext) -> dict:
    decode = pool_metrics(ctx.metrics).get("decode", ctx.metrics)
    out: dict = {}
    if decode.has("kv_transfer_hist"):
        out["server_transfer_p50_s"] = decode.histogram_quantile("kv_transfer_hist", 0.5)
        out["server_transfer_p99_s"] = decode.histogram_quantile("kv_transfer_hist", 0.99)
    if decode.has("kv_transfer_queue"):
        out["transfer_queue_max"] = float(decode.gauge("kv_transfer_queue").max())
    if decode.has("kv_transfer_wait"):
        total = decode.counter_total("kv_transfer_wait")
        span = float(total.index.max() - total.index.min()) if len(total) > 1 else 0.0
        replicas = decode.samples.loc[decode.samples["key"] == "kv_transfer_wait", "labels"].nunique()
        out["decode_wait_s"] = float(total.iloc[-1]) if len(total) else 0.0
        out["decode_wait_share"] = out["decode_wait_s"] / (span * max(replicas, 1)) if span > 0 else None
    return out


def kv_transfer(ctx: DiagnosisContext) -> Finding | None:
    frame = ctx.ok
    transfer_all = frame["kv_transfer_s"].to_numpy(dtype=np.float64)
    handed = np.isfinite(transfer_all)
    if handed.sum() < MIN_REQUESTS:
        return None
    sub = frame[handed]
    transfer = transfer_all[handed]
    ttft = sub["ttft_s"].to_numpy(dtype=np.float64)
    t_stats, ttft_stats = describe(transfer, with_ci=False), describe(ttft, with_ci=False)
    share = t_stats["p50"] / ttft_stats["p50"] if ttft_stats["p50"] else None
    first, later = handoff_gaps(ctx, sub.index.to_numpy(dtype=np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        gap_ratio_each = first / later
    known = np.isfinite(gap_ratio_each)
    gap_ratio = float(np.median(gap_ratio_each[known])) if known.sum() >= MIN_REQUESTS else None
    stalled = known & (gap_ratio_each > STALLED_GAP)
    server = _server_evidence(ctx)
    wait_share = server.get("decode_wait_share")

    high = (share or 0) >= SHARE_HIGH or (gap_ratio or 0) >= GAP_HIGH or (wait_share or 0) >= WAIT_HIGH
    medium = (share or 0) >= SHARE_MEDIUM or (gap_ratio or 0) >= GAP_MEDIUM or (wait_share or 0) >= WAIT_MEDIUM
    if not medium:
        return None
    severity = "high" if high else "medium"
    evidence = {
        "n": int(handed.sum()),
        "kv_transfer_s": {k: t_stats[k] for k in ("n", "p50", "p90", "p99")},
        "ttft_s": {k: ttft_stats[k] for k in ("n", "p50", "p99")},
        "transfer_share_of_ttft": share,
        "handoff_gap_ratio": gap_ratio,
        "handoff_gap_p50_s": float(np.median(first[known])) if known.any() else None,
        "later_gap_p50_s": float(np.median(later[known])) if known.any() else None,
        "stalled_requests": int(stalled.sum()),
        "stalled_share": float(stalled.sum() / known.sum()) if known.any() else None,
        **server,
        # 1 = no effect; 2 = at the medium threshold of a share, or a handoff gap twice the later gaps
        "effect": max(share_effect(share or 0.0, SHARE_MEDIUM), gap_ratio or 1.0,
                      share_effect(wait_share or 0.0, WAIT_MEDIUM)),
    }
    parts = [f"The KV transfer between the prefill and decode pools took {ms(t_stats['p50'])} at the median "
             f"and {ms(t_stats['p99'])} at p99 (n={t_stats['n']})"]
    if share is not None:
        parts.append(f"{pct(share)} of the median TTFT ({ms(ttft_stats['p50'])})")
    summary = ", ".join(parts) + "."
    if gap_ratio is not None:
        summary += (f" After the first token, streams stalled at the handoff: the gap to the second token was "
                    f"{gap_ratio:.1f}x a request's later gaps at the median, and {int(stalled.sum())} requests "
                    f"({pct(evidence['stalled_share'] or 0)}) waited more than {STALLED_GAP:g}x.")
    if wait_share is not None:
        summary += f" The decode pool idled waiting for transfers {pct(wait_share)} of the time."
    return Finding(
        rule="kv_transfer", severity=severity,
        title=f"KV transfer stalls decoding: {ms(t_stats['p50'])} per request"
              + (f", handoff gap {gap_ratio:.1f}x the later gaps" if gap_ratio is not None else ""),
        summary=summary, evidence=evidence,
        slices=[{"dimension": "pool", "value": "decode", "stalled": int(stalled.sum())}],
        suggestion=("The transfer is on the decode path of every disaggregated request: use a faster link or "
                    "transport (NCCL or CUDA IPC instead of host copies), transfer layer by layer while the "
                    "prefill runs, add decode engines if transfers queue, or keep short prompts colocated "
                    "where their transfer costs more than their prefill."),
        _affected=sub["request_id"].to_numpy(dtype=object)[stalled],
    )
