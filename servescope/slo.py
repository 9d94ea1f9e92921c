"""Service-level objectives: parsing `--slo ttft_p99=500ms,...` and judging a run against them.

One SLO is `<metric>_<stat>=<threshold>`: metric `ttft`, `tpot`, `itl` or
`e2e`, `ttft_sched` or `e2e_sched` (TTFT and E2E from the scheduled send time:
what users saw when the load generator was late), or `flow` (the duration of a
scripted user's task, end to end); stat
`mean`, `p50`, `p90`, `p95`, `p99` or `p99.9` (also spelled `p999`);
threshold a duration (`500ms`, `2s`, `1m`; a bare number is seconds).
`error_rate=<x>` (failed requests) and `flow_error_rate=<x>` (flows that did
not end ok) take a fraction or a percentage (`0.001`, `0.1%`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from servescope.errors import UsageError
from servescope.units import DurationError, parse_seconds

REQUEST_METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_s", "e2e": "e2e_s",
                   "ttft_sched": "ttft_from_scheduled_s", "e2e_sched": "e2e_from_scheduled_s"}
SCHEDULED_METRICS = ("ttft_from_scheduled_s", "e2e_from_scheduled_s")
# Judged on flows.parquet (scripted users), not per request: they never decide a request's goodput.
FLOW_METRICS = {"flow": "flow_duration_s"}
LATENCY_METRICS = {**REQUEST_METRICS, **FLOW_METRICS}
RATE_METRICS = ("error_rate", "flow_error_rate")
STATS = ("mean", "p50", "p90", "p95", "p99", "p99.9")
_STAT_ALIASES = {"p999": "p99.9", "p99_9": "p99.9"}


class SLOError(UsageError):
    """An SLO string that cannot be understood; the message says which part and what is allowed."""


@dataclass(frozen=True)
class SLO:
    """One objective: `stat` of `metric` must be <= `threshold` (seconds, or a fraction for error_rate)."""

    name: str  # as the user wrote the key, e.g. "ttft_p99"
    metric: str  # "ttft_s" | "tpot_s" | "itl_s" | "e2e_s" | "flow_duration_s" | "error_rate" | "flow_error_rate"
    stat: str  # one of STATS, or "rate" for the error rates
    threshold: float

    def __post_init__(self) -> None:
        if self.metric in RATE_METRICS:
            if self.stat != "rate" or not 0 <= self.threshold <= 1:
                raise SLOError(f"{self.name}: {self.metric} must be a fraction in [0, 1], got {self.threshold}")
        elif self.metric not in LATENCY_METRICS.values() or self.stat not in STATS:
            raise SLOError(f"{self.name}: unknown metric/stat {self.metric}/{self.stat}")
        elif not self.threshold > 0:
            raise SLOError(f"{self.name}: threshold must be positive, got {self.threshold}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "stat": self.stat, "threshold": self.threshold}


def parse_duration(text: str) -> float:
    """Seconds from `500ms`, `2s`, `1m`, `250us`; a bare number is seconds (as everywhere in the CLI)."""
    try:
        return parse_seconds(text)
    except DurationError as exc:
        raise SLOError(f"{text!r} is not a duration: {exc}") from None


def parse_slos(text: str | None) -> list[SLO]:
    """SLOs from `ttft_p99=500ms,tpot_p99=50ms,e2e_p99=2s,error_rate=0.1%` (empty text: none)."""
    if text is None or not text.strip():
        return []
    slos: list[SLO] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise SLOError(f"{part!r}: expected KEY=VALUE, e.g. ttft_p99=500ms or error_rate=0.1%")
        slos.append(_parse_one(key, value))
    names = [s.name for s in slos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SLOError(f"SLO given more than once: {', '.join(duplicates)}")
    return slos


def _parse_one(key: str, value: str) -> SLO:
    if key in RATE_METRICS:
        try:
            rate = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise SLOError(f"{key}={value!r}: expected a fraction (0.001) or a percentage (0.1%)") from None
        return SLO(name=key, metric=key, stat="rate", threshold=rate)
    # The longest metric name the key starts with: `ttft_sched_p99` is ttft_sched's p99, not ttft's `sched_p99`.
    metric = next((m for m in sorted(LATENCY_METRICS, key=len, reverse=True) if key.startswith(m + "_")),
                  key.partition("_")[0])
    stat = key[len(metric) + 1:]
    stat = _STAT_ALIASES.get(stat, stat)
    if metric not in LATENCY_METRICS or stat not in STATS:
        raise SLOError(
            f"{key!r}: unknown objective. Use <metric>_<stat> with metric one of "
            f"{', '.join(LATENCY_METRICS)} and stat one of {', '.join(STATS)}, or {' or '.join(RATE_METRICS)}"
        )
    try:
        threshold = parse_duration(value)
    except SLOError as exc:
        raise SLOError(f"{key}={value!r}: {exc}") from None
    return SLO(name=key, metric=LATENCY_METRICS[metric], stat=stat, threshold=threshold)


def slos_from_run(run: dict[str, Any]) -> list[SLO]:
    """The SLOs recorded in run.json's `slo` field (a string, a dict or a list of SLO dicts)."""
    raw = run.get("slo")
    if not raw:
        return []
    if isinstance(raw, str):
        return parse_slos(raw)
    if isinstance(raw, dict) and "objectives" not in raw:
        return parse_slos(",".join(f"{k}={v}" for k, v in raw.items()))
    items = raw.get("objectives", []) if isinstance(raw, dict) else raw
    return [SLO(name=i["name"], metric=i["metric"], stat=i["stat"], threshold=float(i["threshold"])) for i in items]


def evaluate(slos: list[SLO], metrics: dict[str, dict[str, Any]], error_rate: float) -> dict[str, Any]:
    """Verdict of each SLO against one group's described metrics; `ok` only if every one is met.

    `metrics` maps an SLO metric to its figures (`{"p99": ..., "n": ...}`; the flow
    error rate as `{"rate": ..., "n": ...}`). A latency objective with no samples
    is failed, not passed: "no data" (a flow SLO on a run without scripted users
    too) must never turn a CI job green.
    """
    objectives = []
    for slo in slos:
        value = error_rate if slo.metric == "error_rate" else metrics.get(slo.metric, {}).get(slo.stat)
        ok = value is not None and value <= slo.threshold
        entry = slo.to_dict() | {"value": value, "ok": bool(ok)}
        if slo.metric != "error_rate":
            entry["n"] = metrics.get(slo.metric, {}).get("n", 0)
        objectives.append(entry)
    return {"ok": all(o["ok"] for o in objectives), "objectives": objectives}


def requests_meeting(slos: list[SLO], frame: pd.DataFrame, itl_max: np.ndarray) -> np.ndarray:
    """Boolean per row: the request succeeded and met every latency SLO (for goodput).

    Per request, a latency SLO is judged on that request's own value: its TTFT,
    its TPOT, its E2E, and for ITL its largest gap (every token arrived in time).
    """
    ok = (frame["status"] == "ok").to_numpy().copy()
    scheduled = {}
    if any(slo.metric in SCHEDULED_METRICS for slo in slos):
        from servescope.analyzers.from_scheduled import from_scheduled_columns

        scheduled = from_scheduled_columns(frame)  # older runs: derived from scheduled_at
    for slo in slos:
        if slo.metric not in REQUEST_METRICS.values():
            continue  # the error rates and flow objectives judge a whole group, not one request
        value = (itl_max if slo.metric == "itl_s" else scheduled[slo.metric] if slo.metric in scheduled
                 else frame[slo.metric].to_numpy(dtype=np.float64))
        # A missing TPOT (one-token output) cannot violate a TPOT objective.
        ok &= ~(value > slo.threshold)
    return ok
