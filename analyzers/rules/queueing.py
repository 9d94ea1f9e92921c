"""Rule `queueing`: arrivals outrun completions, so requests wait longer the longer the run goes.

Judged per measured phase (a sweep saturates only at its top rates), from the
client side alone so it works against any endpoint: the send rate exceeds the
completion rate, the number of requests in flight keeps growing (a line fitted
through it over the phase rises by at least MIN_BACKLOG_GROWTH requests, so a
burst near the end is not taken for it), and TTFT rises from the first third of
the phase to the last. The server's waiting-queue gauge
and queue-time histogram, when scraped, are added as evidence.

A closed loop cannot outrun the server (each slot waits for its answer), but
with more slots than the server runs at once it keeps a standing queue: when
the server's waiting gauge stays at 1 or more and its queue-time histogram
says requests spent at least half of their TTFT waiting, that is reported too
(medium: latency is set by the offered concurrency, not by the engine's speed).
The share is of means (the histogram's exact _sum / _count against the
client's mean TTFT) where the server exports them: a closed loop whose requests
come back in waves queues only the tail of each wave, so its median queue time
is small while the waves still cost most of the mean TTFT (an H200 run: mean
381 of 766 ms). Without _sum / _count, the medians.

A phase that keeps up on average can still queue in bursts (one tenant's
batch job): neither test above sees it, so each phase without a growing or
standing queue is searched for episodes (`queue_episodes`): windows where
arrivals outran a working server and waiting grew, with their times, depth and
whose arrivals drove them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import median, ms
from servescope.analyzers.rules.queue_episodes import episodic_finding, find_episodes

MIN_REQUESTS = 20
RATE_EXCESS = 1.10  # arrivals at least 10% above completions
TTFT_GROWTH = 1.5  # last-third median TTFT over first-third
MIN_RHO = 0.3
# The backlog must grow by this many requests over the phase, as fitted by a line through requests
# in flight (sampled evenly over the phase). A stable queue's bursts raise in flight for a moment and
# the last send always adds one, so comparing two instants alone fired on 38 of 300 short, stable
# two-slot runs at 61% utilization (23 requests each); with this bound, 7. The fitted growth of a
# saturated run is its arrival excess times the phase length (20 against 6.2 req/s for 4 s: 53 on
# the saturation lab). The price is on short runs barely over capacity, where a few requests of
# backlog cannot be told from a burst: at 1.23x capacity and 23 requests it fires on 62 of 100
# runs instead of 89.
MIN_BACKLOG_GROWTH = 4.0
STANDING_WAITING = 1.0  # mean requests in the server's waiting queue
QUEUE_SHARE_OF_TTFT = 0.5


def queueing(ctx: DiagnosisContext) -> Finding | None:
    growing, standing, episodic = None, None, None
    for phase, group in ctx.frame.groupby(ctx.frame["phase"].fillna(""), sort=False):
        result = _judge_phase(ctx, str(phase), group)
        if result and (growing is None or result["ttft_growth"] > growing["ttft_growth"]):
            growing = result
        if result is None:
            queue = _standing_queue(ctx, str(phase), group)
            if queue and (standing is None or queue["queue_share_of_ttft"] > standing["queue_share_of_ttft"]):
                standing = queue
            episodes = find_episodes(ctx, str(phase), group) if queue is None else None
            if episodes and (episodic is None or episodes.delayed > episodic.delayed):
                episodic = episodes
    if growing is not None:
        return _growing_finding(growing)
    if standing is not None:
        return _standing_finding(standing)
    if episodic is not None:
        return episodic_finding(episodic)
    return None


def _growing_finding(best: dict) -> Finding:
    severity = "high" if best["ttft_growth"] >= 3 else "medium"
    chart, affected = best.pop("_chart"), best.pop("_affected")
    best["effect"] = best["ttft_growth"]
    return Finding(
        rule="queueing",
        severity=severity,
        title=f"Saturated: requests arrive faster than they complete ({best['arrival_rate']:.2f} vs {best['completion_rate']:.2f} req/s)",
        summary=(
            f"In phase {best['phase'] or 'run'}, requests were sent at {best['arrival_rate']:.2f} req/s but completed at "
            f"{best['completion_rate']:.2f} req/s, so requests in flight grew from {best['in_flight_early']} to "
            f"{best['in_flight_end']} (a fitted rise of {best['backlog_growth']:.0f} over the phase) and median TTFT "
            f"rose {best['ttft_growth']:.1f}x from the first third "
            f"({ms(best['ttft_p50_first_third_s'])}) to the last ({ms(best['ttft_p50_last_third_s'])}). "
            "Latency here is set by how long the run lasted, not by the server's speed."
        ),
        evidence=best,
        slices=[{"dimension": "phase", "value": best["phase"]}],
        suggestion=(
            f"The server's capacity for this workload is about {best['completion_rate']:.2f} req/s: offer less, add "
            "replicas, or find the highest rate that meets the SLO with `servescope capacity`."
        ),
        chart=chart,
        _affected=affected,
    )


def _standing_finding(best: dict) -> Finding:
    chart, affected = best.pop("_chart"), best.pop("_affected")
    best["effect"] = 1.0 / (1.0 - min(best["queue_share_of_ttft"], 0.95))  # 2 when half the TTFT is queue
    return Finding(
        rule="queueing",
        severity="medium",
        title=f"A standing queue: requests spend {best['queue_share_of_ttft'] * 100:.0f}% of their TTFT waiting in the server",
        summary=(
            f"In phase {best['phase'] or 'run'}, the server kept {best['server_waiting_mean']:.1f} requests waiting on average "
            f"(at most {best['server_waiting_max']:.0f}); {_queue_sentence(best)} More requests arrive at once than "
            "the server admits in a step or runs together."
        ),
        evidence=best,
        slices=[{"dimension": "phase", "value": best["phase"]}],
        suggestion=(
            "Lower the concurrency to what the server runs at once, or raise its batch limits (max-num-seqs, KV cache "
            "size) if memory allows; otherwise the extra concurrency only adds queue time. When the median queue is "
            "short and the mean long, requests arrive in waves (a closed loop with equal lengths stays in lockstep): a "
            "larger step token budget (max-num-batched-tokens) admits a wave's prompts sooner, and mixed lengths or a "
            "ramp break the lockstep."
        ),
        chart=chart,
        _affected=affected,
    )


def _queue_sentence(best: dict) -> str:
    median_part = f"median queue time {ms(best['server_queue_time_p50_s'])} of a median TTFT of {ms(best['ttft_p50_s'])}"
    if best["share_of"] == "means":
        return (f"its mean queue time was {ms(best['server_queue_time_mean_s'])} of a mean TTFT of "
                f"{ms(best['ttft_mean_s'])} ({median_part}).")
    return f"its {median_part}."


def _standing_queue(ctx: DiagnosisContext, phase: str, group: pd.DataFrame) -> dict | None:
    ok = group[(group["status"] == "ok") & group["ttft_s"].notna()]
    if len(ok) < MIN_REQUESTS:
        return None
    start, stop = float(np.nanmin(group["sent_at"])), float(np.nanmax(group["sent_at"]))
    waiting = ctx.metrics.gauge("waiting")
    waiting = waiting[(waiting.index >= start) & (waiting.index <= stop)]
    queue_p50 = ctx.metrics.histogram_quantile("queue_hist", 0.5, start, stop)
    queue_mean = ctx.metrics.histogram_mean("queue_hist", start, stop)
    ttft_p50, ttft_mean = median(ok["ttft_s"]), float(ok["ttft_s"].mean())
    if len(waiting) < 2 or queue_p50 is None or not ttft_p50:
        return None
    by_mean = queue_mean is not None and ttft_mean > 0
    share = queue_mean / ttft_mean if by_mean else queue_p50 / ttft_p50
    if waiting.mean() < STANDING_WAITING or share < QUEUE_SHARE_OF_TTFT:
        return None
    running = ctx.metrics.gauge("running")
    traces = [charts.line(waiting.index.to_numpy(), waiting.to_numpy(), "server waiting queue")]
    if len(running):
        traces.append(charts.line(running.index.to_numpy(), running.to_numpy(), "server running"))
    return {
        "phase": phase,
        "server_waiting_mean": float(waiting.mean()),
        "server_waiting_max": float(waiting.max()),
        "server_queue_time_p50_s": queue_p50,
        "server_queue_time_mean_s": queue_mean,
        "ttft_p50_s": ttft_p50,
        "ttft_mean_s": ttft_mean,
        "share_of": "means" if by_mean else "medians",
        "queue_share_of_ttft": min(share, 1.0),
        "n": int(len(ok)),
        "_affected": ok["request_id"].to_numpy(dtype=object),
        "_chart": charts.figure(traces, f"Server queue, phase {phase or 'run'}", "time in run (s)", "requests"),
    }


def _in_flight(sent: np.ndarray, end: np.ndarray, at: np.ndarray) -> np.ndarray:
    sent_sorted, end_sorted = np.sort(sent[np.isfinite(sent)]), np.sort(end[np.isfinite(end)])
    return np.searchsorted(sent_sorted, at, side="right") - np.searchsorted(end_sorted, at, side="right")


def _backlog_growth(sent: np.ndarray, end: np.ndarray, start: float, stop: float) -> float:
    """Requests in flight gained over [start, stop], from a least-squares line through 200 even samples."""
    grid = np.linspace(start, stop, 200)
    slope = np.polyfit(grid - start, _in_flight(sent, end, grid).astype(np.float64), 1)[0]
    return float(slope * (stop - start))


def _judge_phase(ctx: DiagnosisContext, phase: str, group: pd.DataFrame) -> dict | None:
    ok = group[(group["status"] == "ok") & group["ttft_s"].notna()]
    if len(ok) < MIN_REQUESTS:
        return None
    sent = group["sent_at"].to_numpy(dtype=np.float64)
    end = group["end_at"].to_numpy(dtype=np.float64)
    start, stop = np.nanmin(sent), np.nanmax(sent)
    duration = stop - start
    if duration <= 0:
        return None
    arrival_rate = (np.isfinite(sent).sum() - 1) / duration
    completion_rate = np.sum((end >= start) & (end <= stop)) / duration
    early, late = start + duration / 4, stop
    in_flight_early, in_flight_end = (int(v) for v in _in_flight(sent, end, np.array([early, late])))
    backlog_growth = _backlog_growth(sent, end, start, stop)
    ok_sent = ok["sent_at"].to_numpy(dtype=np.float64)
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    first = median(ttft[ok_sent <= start + duration / 3])
    last = median(ttft[ok_sent >= stop - duration / 3])
    if first is None or last is None or first <= 0:
        return None
    growth = last / first
    if growth < TTFT_GROWTH:  # cheap test first; also spares spearmanr a constant input
        return None
    rho = float(spearmanr(ok_sent, ttft).statistic)
    outrun = (arrival_rate > RATE_EXCESS * completion_rate and in_flight_end > in_flight_early
              and backlog_growth >= MIN_BACKLOG_GROWTH)
    if not (outrun and growth >= TTFT_GROWTH and rho >= MIN_RHO):
        return None
    evidence = {
        "phase": phase,
        "arrival_rate": float(arrival_rate),
        "completion_rate": float(completion_rate),
        "in_flight_early": in_flight_early,
        "in_flight_end": in_flight_end,
        "backlog_growth": backlog_growth,
        "ttft_p50_first_third_s": first,
        "ttft_p50_last_third_s": last,
        "ttft_growth": float(growth),
        "ttft_time_spearman": rho,
        "n": int(len(ok)),
        # the backlog builds after the first third: requests sent later are the ones it delayed
        "_affected": ok["request_id"].to_numpy(dtype=object)[ok_sent > start + duration / 3],
    }
    waiting = ctx.metrics.gauge("waiting")
    waiting = waiting[(waiting.index >= start) & (waiting.index <= stop)]
    if len(waiting):
        evidence["server_waiting_max"] = float(waiting.max())
        evidence["server_waiting_last"] = float(waiting.iloc[-1])
    queue_p50 = ctx.metrics.histogram_quantile("queue_hist", 0.5, start, stop)
    if queue_p50 is not None:
        evidence["server_queue_time_p50_s"] = queue_p50
    grid = np.linspace(start, np.nanmax(end) if np.isfinite(end).any() else stop, 200)
    traces = [
        charts.scatter(ok_sent, ttft, "TTFT (ms)", scale=1e3),
        charts.line(grid, _in_flight(sent, end, grid), "requests in flight", yaxis="y2"),
    ]
    if len(waiting):
        traces.append(charts.line(waiting.index.to_numpy(), waiting.to_numpy(), "server waiting queue", yaxis="y2"))
    evidence["_chart"] = charts.figure(
        traces, f"TTFT and requests in flight, phase {phase or 'run'}", "send time in run (s)", "TTFT (ms)",
        yaxis2={"title": {"text": "requests"}, "overlaying": "y", "side": "right"},
    )
    return evidence
