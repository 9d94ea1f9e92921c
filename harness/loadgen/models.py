"""Load models as small strategy objects, and the phases of a run.

A phase is one load model held for a duration or a number of sessions:
`concurrency=64`, `rate=8.0`, `trace`, or `warmup` (the first phase's load,
labelled so the analyzers leave it out). `plan_phases(config)` turns the
run's flags into the list of phases; the dispatcher only asks each load model
two things: is it closed-loop (how many slots, starting when) or open-loop
(when does each session go out).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from servescope.harness.config import DEFAULT_DURATION_S, Arrival, ConfigError, RunConfig
from servescope.harness.loadgen.arrivals import expected_count, send_offsets, slot_offsets

WARMUP_PHASE = "warmup"


@dataclass(frozen=True)
class ConcurrencyLoad:
    """Closed loop: `concurrency` slots, each sends its next session when its previous one ends."""

    concurrency: int
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")

    closed = True

    @property
    def label(self) -> str:
        return f"concurrency={self.concurrency}"

    @property
    def peak_concurrency(self) -> int:
        return self.concurrency

    @property
    def peak_rate(self) -> float:
        return 0.0

    def slot_offsets(self) -> list[float]:
        return slot_offsets(self.concurrency, self.ramp_s)

    def describe(self) -> dict:
        return {"kind": "concurrency", "concurrency": self.concurrency, "ramp_s": self.ramp_s}


@dataclass(frozen=True)
class RateLoad:
    """Open loop: sessions go out at seeded send times, whatever the server is doing."""

    rate: float
    arrival: Arrival = Arrival()
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ConfigError(f"rate must be positive, got {self.rate}")

    closed = False

    @property
    def label(self) -> str:
        return f"rate={self.rate:.1f}" if self.rate >= 0.1 else f"rate={self.rate:g}"

    @property
    def peak_concurrency(self) -> int:
        return 0

    @property
    def peak_rate(self) -> float:
        return self.rate

    def send_offsets(self, rng: np.random.Generator, duration_s: float | None, count: int | None) -> Iterator[float]:
        return send_offsets(self.arrival, self.rate, rng, duration_s=duration_s, count=count, ramp_s=self.ramp_s)

    def describe(self) -> dict:
        return {"kind": "rate", "rate": self.rate, "arrival": str(self.arrival), "ramp_s": self.ramp_s}


@dataclass(frozen=True)
class TraceLoad:
    """Open loop replaying recorded arrivals (`Session.arrival_s`, already scaled by the trace speed)."""

    path: str
    speed: float = 1.0

    closed = False
    label = "trace"

    @property
    def peak_concurrency(self) -> int:
        return 0

    @property
    def peak_rate(self) -> float:
        return 0.0  # unknown until the trace is read; the worker rule falls back to one worker

    def describe(self) -> dict:
        return {"kind": "trace", "path": self.path, "speed": self.speed}


LoadModel = ConcurrencyLoad | RateLoad | TraceLoad


@dataclass(frozen=True)
class Phase:
    """One step of a run: a load model held for `duration_s` and/or `requests` sessions."""

    name: str
    load: LoadModel
    duration_s: float | None
    requests: int | None

    def __post_init__(self) -> None:
        if self.duration_s is None and self.requests is None and not isinstance(self.load, TraceLoad):
            raise ConfigError(f"phase {self.name}: needs a duration or a request count")

    @property
    def measured(self) -> bool:
        return self.name != WARMUP_PHASE

    def expected_sessions(self) -> int | None:
        """For progress display: the request count, or an estimate from rate x duration."""
        if self.requests is not None:
            return self.requests
        if isinstance(self.load, RateLoad) and self.duration_s is not None:
            return expected_count(self.load.rate, self.duration_s, self.load.ramp_s)
        return None

    def describe(self) -> dict:
        return {"phase": self.name, "duration_s": self.duration_s, "requests": self.requests, **self.load.describe()}


def plan_phases(config: RunConfig) -> list[Phase]:
    """The phases of a run, warm-up first (DESIGN.md load models)."""
    loads = _loads(config)
    duration, requests = config.duration_s, config.requests
    if duration is None and requests is None and config.trace is None:
        duration = DEFAULT_DURATION_S
    phases = [Phase(load.label, load, duration, requests) for load in loads]
    if config.warmup_s > 0:
        phases.insert(0, Phase(WARMUP_PHASE, loads[0], config.warmup_s, None))
    return phases


def _loads(config: RunConfig) -> list[LoadModel]:
    ramp = config.ramp_s
    if config.trace is not None:
        return [TraceLoad(config.trace, config.trace_speed)]
    if config.sweep is not None:
        if config.sweep.kind == "rate":
            return [RateLoad(v, config.arrival, ramp) for v in config.sweep.values]
        return [ConcurrencyLoad(int(v), config.ramp_for(v)) for v in config.sweep.values]
    if config.rate is not None:
        return [RateLoad(config.rate, config.arrival, ramp)]
    concurrency = config.concurrency or 1
    return [ConcurrencyLoad(concurrency, config.ramp_for(concurrency))]


# Worker-count rule (documented in `servescope run --help`). Measured with
# benchmarks/run_schedule.py (scripted server, 8-token outputs, 2 CPUs): one
# worker kept p99 schedule lag under 7 ms up to 400 req/s open loop, but went
# client-bound at 64 always-busy closed-loop streams (~12k chunks/s), which two
# workers handled. Per-worker budgets below leave headroom for longer outputs
# (more chunks per request). Never more workers than the cores left once the
# main process has one.
STREAMS_PER_WORKER = 48
RATE_PER_WORKER = 200.0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (`taskset`, a container's cpuset), not the
    host's count. Under `taskset -c 0,1` on a 16-core host, cpu_count() says 16 and the rule
    would start 11 workers on two cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def default_workers(phases: list[Phase], cpu_count: int) -> int:
    """min(cpus - 1, ceil(peak load / per-worker capacity)), at least 1; `cpu_count` from usable_cpus()."""
    peak_conc = max((p.load.peak_concurrency for p in phases), default=0)
    peak_rate = max((p.load.peak_rate for p in phases), default=0.0)
    needed = max(1, math.ceil(peak_conc / STREAMS_PER_WORKER), math.ceil(peak_rate / RATE_PER_WORKER))
    return max(1, min(needed, cpu_count - 1))
