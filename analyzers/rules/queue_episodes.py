"""Episodic queueing: arrivals outrun a working server for a while, and every request sent then waits.

A server that keeps up on average still queues when arrivals come in bursts:
one tenant's batch job, a retry storm, traffic that lands on the minute.
While a burst lasts, arrivals outrun completions, the queue grows and every
request sent meanwhile waits, whoever sent it; afterwards the queue drains.
Over a whole phase arrivals and completions match and TTFT has no trend, so
the phase-level test of `queueing` sees nothing. Found from the client's own
timestamps, so it works against any endpoint:

* the calm TTFT is the lower quartile of a rolling median of TTFT (ROLLING
  requests in send order): right as long as a quarter of the requests were
  sent in calm, which an episodic queue leaves by definition;
* an episode is a stretch of requests whose rolling median TTFT is at least
  EPISODE_FACTOR times the calm one (stretches under MERGE_S apart are one);
* it is queueing when, from its start to its peak of requests in flight,
  arrivals outran completions by RATE_EXCESS, requests in flight rose by at
  least MIN_BACKLOG_GROWTH, and the server kept completing at no less than
  MIN_COMPLETION_SHARE of its rate over the phase: a server that stopped
  (`stall`) or froze in a long prefill (`convoy`) completes nothing meanwhile;
* and it is a burst: arrivals during the rise at least BURST_FACTOR times
  their rate outside the stretches of high TTFT. A server near its capacity
  also queues now and then at its usual arrival rate, when long requests hold
  its slots (heavy-tailed outputs); that is how such a server behaves, not an
  episode with a cause to name. The excess must also be more than chance:
  a Poisson count at the calm rate reaches it with probability under
  BURST_ALPHA divided by the number of disjoint windows as long as the rise
  in the phase (a scan over the run finds a few short clusters anywhere);
* whose arrivals drove it: each tenant's arrivals during the rise against
  what its rate outside the episodes would have sent in that time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import poisson

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import ms, pct

ROLLING = 25  # requests in send order: enough for a median, few enough to follow a burst of seconds
CALM_QUANTILE = 0.25
EPISODE_FACTOR = 3.0  # rolling median TTFT over the calm one
MERGE_S = 1.0
MIN_EPISODE_REQUESTS = 20
RATE_EXCESS = 1.10  # arrivals at least 10% above completions during the rise
MIN_BACKLOG_GROWTH = 4  # requests in flight gained from the episode's start to its peak
MIN_COMPLETION_SHARE = 0.75
BURST_FACTOR = 1.5  # arrivals during the rise over the rate outside the stretches of high TTFT
BURST_ALPHA = 0.01  # their excess against a Poisson count at the calm rate, Bonferroni over the run's windows
MAX_REPORTED = 20  # episodes listed in the evidence (the deepest), all of them counted
MEDIUM_SHARE = 0.05  # of the phase's requests sent during an episode
HIGH_SHARE, HIGH_DEPTH = 0.20, 10.0  # and their median TTFT over the calm one
DRIVER_SHARE = 0.5  # a tenant is named when it sent at least this share of the arrivals above the usual


@dataclass
class Driver:
    """One tenant's arrivals during the rises of the episodes, against its calm rate."""

    tenant: str
    arrivals: int
    expected: float  # what its rate outside the episodes would have sent meanwhile
    excess: float
    share_of_excess: float


@dataclass
class Episode:
    start_s: float
    end_s: float
    peak_at_s: float  # the most requests in flight
    requests: int  # sent during the episode (ok ones)
    ttft_p50_s: float
    depth: float  # ttft_p50_s over the calm TTFT
    in_flight_start: int
    in_flight_peak: int
    arrival_rate: float  # over the rise, start to peak
    calm_arrival_rate: float  # outside every stretch of high TTFT
    completion_rate: float
    drivers: list[Driver] = field(default_factory=list)
    server_waiting_max: float | None = None


@dataclass
class Episodes:
    """The episodes of one phase, with what they share."""

    phase: str
    calm_ttft_p50_s: float
    completion_rate: float  # over the phase
    episodes: list[Episode]
    requests: int  # ok requests of the phase
    delayed: int  # ok requests sent during an episode
    ttft_p50_in_episodes_s: float
    drivers: list[Driver]
    affected: np.ndarray  # request_ids sent during an episode
    chart: dict[str, Any]

    @property
    def share(self) -> float:
        return self.delayed / self.requests if self.requests else 0.0

    @property
    def depth(self) -> float:
        return self.ttft_p50_in_episodes_s / self.calm_ttft_p50_s

    def evidence(self) -> dict[str, Any]:
        deepest = sorted(self.episodes, key=lambda e: -e.depth)[:MAX_REPORTED]
        return {
            "phase": self.phase,
            "episodes": [asdict(e) for e in sorted(deepest, key=lambda e: e.start_s)],
            "episodes_total": len(self.episodes),
            "calm_ttft_p50_s": self.calm_ttft_p50_s,
            "ttft_p50_in_episodes_s": self.ttft_p50_in_episodes_s,
            "ttft_depth": self.depth,
            "delayed_requests": self.delayed,
            "delayed_share": self.share,
            "completion_rate": self.completion_rate,
            "drivers": [asdict(d) for d in self.drivers],
            "n": self.delayed,
            "effect": self.depth,
        }


@dataclass
class _Timeline:
    """A phase's requests sorted once by send and by end time, so each window is counted by bisection.

    A million-row run has thousands of windows to judge; a mask over every
    request per window made that quadratic.
    """

    sent: np.ndarray  # sorted, finite
    end: np.ndarray  # sorted, finite
    tenant_codes: np.ndarray  # in the order of `sent`; -1: no tenant
    tenant_names: list[str]

    @classmethod
    def of(cls, group: pd.DataFrame) -> _Timeline:
        sent = group["sent_at"].to_numpy(dtype=np.float64)
        end = group["end_at"].to_numpy(dtype=np.float64)
        codes, names = pd.factorize(group["tenant"])
        keep = np.isfinite(sent)
        order = np.argsort(sent[keep], kind="stable")
        return cls(sent=sent[keep][order], end=np.sort(end[np.isfinite(end)]), tenant_codes=codes[keep][order],
                   tenant_names=[str(n) for n in names])

    @property
    def span_s(self) -> float:
        return float(self.sent[-1] - self.sent[0]) if len(self.sent) else 0.0

    def in_flight(self, at: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sent, at, side="right") - np.searchsorted(self.end, at, side="right")

    def sent_between(self, a: float, b: float) -> int:
        return int(np.searchsorted(self.sent, b, side="right") - np.searchsorted(self.sent, a, side="left"))

    def ended_between(self, a: float, b: float) -> int:
        return int(np.searchsorted(self.end, b, side="right") - np.searchsorted(self.end, a, side="left"))

    def tenant_counts(self, a: float, b: float) -> np.ndarray:
        """Requests sent in [a, b] per tenant code."""
        lo, hi = np.searchsorted(self.sent, a, side="left"), np.searchsorted(self.sent, b, side="right")
        codes = self.tenant_codes[lo:hi]
        return np.bincount(codes[codes >= 0], minlength=len(self.tenant_names))


def find_episodes(ctx: DiagnosisContext, phase: str, group: pd.DataFrame) -> Episodes | None:
    ok = group[(group["status"] == "ok") & group["ttft_s"].notna()].sort_values("sent_at", kind="stable")
    if len(ok) < max(4 * ROLLING, MIN_EPISODE_REQUESTS):
        return None
    ok_sent = ok["sent_at"].to_numpy(dtype=np.float64)
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    rolling = pd.Series(ttft).rolling(ROLLING, center=True, min_periods=ROLLING // 2).median().to_numpy()
    calm_ttft = float(np.nanquantile(rolling, CALM_QUANTILE))
    if not calm_ttft > 0:
        return None
    stretches = _stretches(rolling >= EPISODE_FACTOR * calm_ttft, ok_sent)
    if not stretches:
        return None
    line = _Timeline.of(group)
    if line.span_s <= 0:
        return None
    completion_rate = line.ended_between(line.sent[0], line.sent[-1]) / line.span_s
    spans = [(float(ok_sent[a]), float(ok_sent[b])) for a, b in stretches]
    calm_s = line.span_s - sum(b - a for a, b in spans)
    calm_rate = (len(line.sent) - sum(line.sent_between(a, b) for a, b in spans)) / calm_s if calm_s > 0 else 0.0
    waiting = ctx.metrics.gauge("waiting")
    episodes, delayed = [], np.zeros(len(ok), bool)
    for first, last in stretches:
        ep = _judge(line, ok_sent, ttft, first, last, calm_ttft, completion_rate, calm_rate)
        if ep is None:
            continue
        if len(waiting):
            inside = waiting.iloc[waiting.index.searchsorted(ep.start_s, "left"):waiting.index.searchsorted(ep.end_s, "right")]
            ep.server_waiting_max = float(inside.max()) if len(inside) else None
        episodes.append(ep)
        delayed[first:last + 1] = True
    if not episodes:
        return None
    calm = _CalmArrivals.outside(line, [(e.start_s, e.end_s) for e in episodes])
    for ep in episodes:
        ep.drivers = _drivers(line, [(ep.start_s, ep.peak_at_s)], calm)[:3]
    return Episodes(
        phase=phase, calm_ttft_p50_s=calm_ttft, completion_rate=completion_rate, episodes=episodes,
        requests=len(ok), delayed=int(delayed.sum()), ttft_p50_in_episodes_s=float(np.median(ttft[delayed])),
        drivers=_drivers(line, [(e.start_s, e.peak_at_s) for e in episodes], calm),
        affected=ok["request_id"].to_numpy(dtype=object)[delayed],
        chart=_chart(phase, ok_sent, ttft, line, episodes),
    )


def _stretches(high: np.ndarray, sent: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) row of each run of `high` rows, runs under MERGE_S apart merged, at least MIN_EPISODE_REQUESTS long."""
    edges = np.diff(np.concatenate(([0], high.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    if starts.size == 0:
        return []
    # a run starts a new stretch when it begins MERGE_S or more after the previous run's last request
    new = np.concatenate(([True], sent[starts[1:]] - sent[stops[:-1]] >= MERGE_S))
    heads = np.flatnonzero(new)
    tails = np.concatenate((heads[1:] - 1, [len(starts) - 1]))
    firsts, lasts = starts[heads], stops[tails]
    keep = lasts - firsts + 1 >= MIN_EPISODE_REQUESTS
    return [(int(a), int(b)) for a, b in zip(firsts[keep], lasts[keep])]


def _judge(line: _Timeline, ok_sent, ttft, first, last, calm, completion_rate, calm_rate) -> Episode | None:
    """The stretch of ok rows first..last as an episode of queueing, or None when it is not one."""
    start, stop = float(ok_sent[first]), float(ok_sent[last])
    if stop <= start:
        return None
    grid = np.linspace(start, stop, 100)
    in_flight = line.in_flight(grid)
    peak = int(np.argmax(in_flight))
    peak_at = float(grid[peak])
    rise = peak_at - start
    if rise <= 0 or in_flight[peak] - in_flight[0] < MIN_BACKLOG_GROWTH:
        return None
    arrivals, completions = line.sent_between(start, peak_at), line.ended_between(start, peak_at)
    if arrivals < RATE_EXCESS * completions or completions / rise < MIN_COMPLETION_SHARE * completion_rate:
        return None  # no backlog built, or the server stopped working: not a queue
    if arrivals / rise < BURST_FACTOR * calm_rate:
        return None  # arrivals at their usual rate: the server slowed (long requests holding its slots), no burst
    windows = max(line.span_s / rise, 1.0)  # disjoint windows this long: the scan's tests
    if poisson.sf(arrivals - 1, calm_rate * rise) > BURST_ALPHA / windows:
        return None  # as many arrivals as chance brings somewhere in a run this long
    p50 = float(np.median(ttft[first:last + 1]))
    return Episode(start_s=start, end_s=stop, peak_at_s=peak_at, requests=last - first + 1, ttft_p50_s=p50,
                   depth=p50 / calm, in_flight_start=int(in_flight[0]), in_flight_peak=int(in_flight[peak]),
                   arrival_rate=arrivals / rise, calm_arrival_rate=calm_rate, completion_rate=completions / rise)


@dataclass
class _CalmArrivals:
    """Each tenant's arrivals outside every episode, and the time that covers."""

    counts: np.ndarray
    seconds: float

    @classmethod
    def outside(cls, line: _Timeline, episodes: list[tuple[float, float]]) -> _CalmArrivals:
        inside = sum((line.tenant_counts(a, b) for a, b in episodes), np.zeros(len(line.tenant_names), np.int64))
        return cls(counts=line.tenant_counts(line.sent[0], line.sent[-1]) - inside,
                   seconds=line.span_s - sum(b - a for a, b in episodes))


def _drivers(line: _Timeline, rises: list[tuple[float, float]], calm: _CalmArrivals) -> list[Driver]:
    """Tenants by arrivals in the rises above their rate outside every episode, most excess first."""
    rise_s = sum(b - a for a, b in rises)
    if len(line.tenant_names) < 2 or rise_s <= 0 or calm.seconds <= 0:
        return []
    in_rises = sum((line.tenant_counts(a, b) for a, b in rises), np.zeros(len(line.tenant_names), np.int64))
    expected = calm.counts / calm.seconds * rise_s
    excess = in_rises - expected
    total = float(np.clip(excess, 0, None).sum())
    order = np.argsort(-excess, kind="stable")
    return [Driver(tenant=line.tenant_names[i], arrivals=int(in_rises[i]), expected=float(expected[i]),
                   excess=float(excess[i]), share_of_excess=float(max(excess[i], 0.0) / total) if total > 0 else 0.0)
            for i in order]


def _chart(phase: str, ok_sent, ttft, line: _Timeline, episodes: list[Episode]) -> dict[str, Any]:
    grid = np.linspace(line.sent[0], line.sent[-1], 400)
    traces = [
        charts.scatter(ok_sent, ttft, "TTFT (ms)", scale=1e3),
        charts.line(grid, line.in_flight(grid), "requests in flight", yaxis="y2"),
        charts.bar([round(e.start_s, 1) for e in episodes], [e.ttft_p50_s * 1e3 for e in episodes],
                   "episode median TTFT (ms), at its start"),
    ]
    return charts.figure(traces, f"Queueing episodes, phase {phase or 'run'}", "send time in run (s)", "TTFT (ms)",
                         yaxis2={"title": {"text": "requests"}, "overlaying": "y", "side": "right"})


def episodic_finding(found: Episodes) -> Finding:
    severity = ("high" if found.share >= HIGH_SHARE and found.depth >= HIGH_DEPTH
                else "medium" if found.share >= MEDIUM_SHARE else "low")
    deepest = max(found.episodes, key=lambda e: e.depth)
    top = found.drivers[0] if found.drivers and found.drivers[0].share_of_excess >= DRIVER_SHARE else None
    driver_text = (
        f" {top.tenant}'s arrivals drove them: it sent {top.arrivals} requests while the queue built, where its "
        f"usual rate would have sent {top.expected:.0f} ({pct(top.share_of_excess)} of the arrivals above the usual)."
        if top else ""
    )
    return Finding(
        rule="queueing",
        severity=severity,
        title=(f"Queueing in {len(found.episodes)} episode(s): bursts of arrivals outran the server"
               + (f", driven by {top.tenant}" if top else "")),
        summary=(
            f"In phase {found.phase or 'run'}, {len(found.episodes)} time(s) arrivals outran completions while the "
            f"server kept completing, and waiting grew: {pct(found.share)} of the requests were sent during one and "
            f"waited {ms(found.ttft_p50_in_episodes_s)} for their first token (median) against "
            f"{ms(found.calm_ttft_p50_s)} in calm. The deepest, {deepest.start_s:.0f}-{deepest.end_s:.0f} s, took "
            f"requests in flight from {deepest.in_flight_start} to {deepest.in_flight_peak} (arrivals "
            f"{deepest.arrival_rate:.1f} req/s against {deepest.completion_rate:.1f} completed) with a median TTFT of "
            f"{ms(deepest.ttft_p50_s)}.{driver_text} Every request sent then waits, whoever sent it."
        ),
        evidence=found.evidence(),
        slices=([{"dimension": "tenant", "value": top.tenant, "role": "cause"}] if top else [])
        + [{"dimension": "time_window", "value": f"{e.start_s:.1f}-{e.end_s:.1f} s"} for e in found.episodes[:10]],
        suggestion=(
            (f"Give {top.tenant} a quota or its own capacity, or smooth its bursts (a client-side rate limit, a "
             "queue in front); " if top else "Smooth the bursts (a rate limit, a queue in front) or ")
            + f"provision for the peak rate rather than the mean: this server completes about "
            f"{max(e.completion_rate for e in found.episodes):.1f} req/s when busy."
        ),
        chart=found.chart,
        _affected=found.affected,
    )
