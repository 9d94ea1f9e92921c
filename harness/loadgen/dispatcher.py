"""The main process's half of the load generator: hands sessions to workers, phase by phase.

Open loop: send times come from the load model; each session is built and
handed to a worker up to `LOOKAHEAD_S` before its send time, so building never
delays sending and a slow server never delays the schedule. Closed loop: each
worker runs its share of the slots and keeps a small buffer of ready sessions,
refilled as sessions finish.

The dispatcher speaks only `harness.loadgen.messages` over a channel
(`send`, `broadcast`, `poll`, `dead`); it does not know how workers send.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from servescope.harness.loadgen.messages import (
    EndPhase,
    Exited,
    Flows,
    Job,
    LoopLag,
    PhaseIdle,
    Ready,
    Records,
    SessionDone,
    Shutdown,
    Started,
    StartPhase,
    Stop,
    WorkerFailed,
)
from servescope.harness.loadgen.models import ConcurrencyLoad, Phase, RateLoad, TraceLoad
from servescope.harness.users.jobs import SlotUser, slot_classes
from servescope.workloads.types import Session

LOOKAHEAD_S = 0.5  # open loop: hand a session to its worker this long before it is due
MAX_AHEAD = 4096  # ...but never more than this many undelivered sessions at once
POLL_S = 0.01  # longest the main loop waits for worker messages before looking at the clock
START_LEAD_S = 0.1  # a phase starts this long after it is announced, so its first wave is queued in time
REFILL_PER_PUMP = 8  # closed loop: sessions built per worker per pump while it still holds a wave beyond its slots
READY_TIMEOUT_S = 60.0  # workers must prewarm within this
EXIT_TIMEOUT_S = 10.0  # after Shutdown/Stop (+ grace) workers must be gone within this


class Channel(Protocol):
    def __len__(self) -> int: ...
    def send(self, worker: int, message: Any) -> None: ...
    def broadcast(self, message: Any) -> None: ...
    def poll(self, timeout: float) -> list[Any]: ...
    def dead(self) -> list[int]: ...


class Hooks(Protocol):
    """What the dispatcher reports to (run directory, console) and asks (should we stop?)."""

    def records(self, rows: list[dict[str, Any]]) -> None: ...
    def flows(self, rows: list[dict[str, Any]]) -> None: ...  # scripted users' task invocations
    def notice(self, text: str) -> None: ...  # something the user should know now (a worker was lost)
    def tick(self, progress: "Progress") -> None: ...
    def stop_requested(self) -> int: ...  # 0: go on; 1: stop gracefully; 2: stop now
    def failure(self) -> str | None: ...  # a reason to abandon the run (e.g. the engine died)


@dataclass
class Progress:
    """Live counters for the console."""

    phase: str = ""
    phase_index: int = 0
    phase_count: int = 0
    phase_started_at: float | None = None
    phase_duration_s: float | None = None
    phase_expected: int | None = None
    phase_done: int = 0
    records: int = 0
    errors: int = 0
    stopping: bool = False
    outstanding: int = 0  # sessions handed to workers and not done: in flight, or queued up to LOOKAHEAD_S ahead


@dataclass
class DispatchResult:
    status: str  # "complete" | "interrupted" | "failed"
    phases: list[dict[str, Any]] = field(default_factory=list)
    loop_lag: list[LoopLag] = field(default_factory=list)
    schedule_lags: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    prewarm: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    notices: list[str] = field(default_factory=list)  # workers' clients' remarks on the target, deduplicated
    flows: int = 0  # scripted users' task invocations recorded
    lost_workers: list[dict[str, Any]] = field(default_factory=list)  # workers that died mid-run (Ray actors)
    retired_users: int = 0  # scripted users retired early (on_start failed, or StopUser)


class _StopRun(Exception):
    """Unwinds the phase loops: "interrupted" (Ctrl-C) or the reason the run failed."""


class Dispatcher:
    """Runs `phases` over the workers behind `channel`, drawing sessions from `sessions`."""

    def __init__(
        self,
        channel: Channel,
        phases: list[Phase],
        sessions: Iterator[Session],
        clock: Callable[[], float],
        hooks: Hooks,
        seed: int = 0,
        grace_s: float = 5.0,
        user_classes: list[tuple[str, float]] | None = None,
    ) -> None:
        self.channel = channel
        self.phases = phases
        self.sessions = sessions
        self.clock = clock
        self.hooks = hooks
        self.seed = seed
        self.grace_s = grace_s
        self.user_classes = user_classes  # scripted users: (class name, weight), in the script's order
        self.workers = len(channel)
        self.result = DispatchResult("complete")
        self.progress = Progress(phase_count=len(phases))
        self.outstanding = [0] * self.workers  # sessions handed to a worker and not yet done
        self.idle: set[int] = set()
        self.exited: set[int] = set()
        self.lost: set[int] = set()  # workers gone mid-run; a channel with `tolerates_loss` lets the run go on
        self.in_flight: list[dict[str, tuple[str, float | None]]] = [{} for _ in range(self.workers)]
        self._rr = itertools.cycle(range(self.workers))

    # -- the run ------------------------------------------------------------------------

    def run(self) -> DispatchResult:
        try:
            self._await_ready()
            for index, phase in enumerate(self.phases):
                self._run_phase(index, phase)
            self._shutdown(Shutdown(), EXIT_TIMEOUT_S)
        except _StopRun as reason:
            self.result.status = "interrupted" if str(reason) == "interrupted" else "failed"
            if str(reason) != "interrupted":
                self.result.problems.append(str(reason))
            self.progress.stopping = True
            self._shutdown(Stop(self.grace_s), self.grace_s + EXIT_TIMEOUT_S)
        return self.result

    def _await_ready(self) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < self.workers:
            for message in self._pump():
                if isinstance(message, Ready):
                    ready.add(message.worker)
                    self.result.prewarm.append({"worker": message.worker, "seconds": message.prewarm_s,
                                                "error": message.error, "transport": message.transport})
            if time.monotonic() > deadline:
                raise _StopRun(f"workers {sorted(set(range(self.workers)) - ready)} did not start within {READY_TIMEOUT_S:.0f}s")

    def _run_phase(self, index: int, phase: Phase) -> None:
        start = self.clock() + START_LEAD_S
        self.idle = set(self.lost)
        self.progress = Progress(
            phase=phase.name, phase_index=index, phase_count=len(self.phases), phase_started_at=start,
            phase_duration_s=phase.duration_s, phase_expected=phase.expected_sessions(),
            records=self.progress.records, errors=self.progress.errors,
        )
        if isinstance(phase.load, ConcurrencyLoad):
            dispatched = self._closed_loop(phase, phase.load, start)
        else:
            dispatched = self._open_loop(phase, start, self._open_schedule(index, phase))
        self.channel.broadcast(EndPhase(phase.name))
        while len(self.idle) < self.workers:
            self._pump()
        self.result.phases.append({**phase.describe(), "start_s": start, "end_s": self.clock(),
                                   "sessions": dispatched})

    # -- closed loop --------------------------------------------------------------------

    def _closed_loop(self, phase: Phase, load: ConcurrencyLoad, start: float) -> int:
        offsets = load.slot_offsets()
        slots: list[list[float]] = [[] for _ in range(self.workers)]
        users: list[list[SlotUser]] = [[] for _ in range(self.workers)]
        classes = slot_classes(self.user_classes, len(offsets)) if self.user_classes else []
        for i, offset in enumerate(offsets):
            slots[i % self.workers].append(start + offset)
            if classes:
                users[i % self.workers].append(SlotUser(i, classes[i]))
        deadline = None if phase.duration_s is None else start + phase.duration_s
        for worker in range(self.workers):
            self.channel.send(worker, StartPhase(phase.name, slots[worker], deadline, users[worker]))
        # Keep each worker a few sessions ahead of its slots: refills ride on SessionDone
        # messages, which arrive up to POLL_S late. A worker that still holds a full wave beyond
        # its slots gets its refill REFILL_PER_PUMP at a time: when hundreds of sessions end
        # together, building the next ones (tokenizing prompts) is spread over the following
        # polls instead of taking a core in one burst while the workers time the next first tokens.
        buffer = [2 * len(s) + 4 if s else 0 for s in slots]
        ahead = [len(s) + 4 for s in slots]
        dispatched = 0
        while True:
            if phase.requests is not None and dispatched >= phase.requests:
                return dispatched
            if deadline is not None and self.clock() >= deadline:
                return dispatched
            for worker in range(self.workers):
                budget = REFILL_PER_PUMP if self.outstanding[worker] >= ahead[worker] else buffer[worker]
                while self.outstanding[worker] < buffer[worker] and worker not in self.lost and budget > 0:
                    budget -= 1
                    if phase.requests is not None and dispatched >= phase.requests:
                        break
                    session = next(self.sessions, None)
                    if session is None:
                        return dispatched
                    self._hand_out(worker, Job(session, phase.name, None))
                    dispatched += 1
            self._pump()

    # -- open loop ----------------------------------------------------------------------

    def _open_schedule(self, index: int, phase: Phase) -> Iterator[tuple[float, Session | None]]:
        """(send offset, session or None = draw the next one) pairs for an open-loop phase."""
        if isinstance(phase.load, RateLoad):
            rng = np.random.default_rng([self.seed, index])
            return ((t, None) for t in phase.load.send_offsets(rng, phase.duration_s, phase.requests))
        assert isinstance(phase.load, TraceLoad)
        return self._trace_schedule(phase)

    def _trace_schedule(self, phase: Phase) -> Iterator[tuple[float, Session]]:
        first: float | None = None
        for count, session in enumerate(self.sessions):
            if phase.requests is not None and count >= phase.requests:
                return
            arrival = session.arrival_s or 0.0
            first = arrival if first is None else first
            offset = arrival - first
            if phase.duration_s is not None and offset >= phase.duration_s:
                return
            yield offset, session

    def _open_loop(self, phase: Phase, start: float, schedule: Iterator[tuple[float, Session | None]]) -> int:
        self.channel.broadcast(StartPhase(phase.name))
        dispatched = 0
        pending = next(schedule, None)
        while pending is not None:
            horizon = self.clock() + LOOKAHEAD_S
            while pending is not None and start + pending[0] <= horizon and sum(self.outstanding) < MAX_AHEAD:
                offset, session = pending
                session = session if session is not None else next(self.sessions, None)
                if session is None:
                    return dispatched
                self._hand_out(self._least_loaded(), Job(session, phase.name, start + offset))
                dispatched += 1
                pending = next(schedule, None)
            self._pump()
        return dispatched

    def _least_loaded(self) -> int:
        """Round-robin, skipping a worker that is far busier than the others."""
        worker = next(self._rr)
        while worker in self.lost:
            worker = next(self._rr)
        low = min(n for w, n in enumerate(self.outstanding) if w not in self.lost)
        if self.outstanding[worker] <= low + 8:
            return worker
        return next(w for w, n in enumerate(self.outstanding) if n == low and w not in self.lost)

    # -- shared plumbing ------------------------------------------------------------------

    def _hand_out(self, worker: int, job: Job) -> None:
        self.outstanding[worker] += 1
        self.channel.send(worker, job)

    def _pump(self) -> list[Any]:
        """Wait briefly for worker messages, handle them, and check for stop/failure."""
        messages = self.channel.poll(POLL_S)
        for message in messages:
            self._handle(message)
        self.progress.outstanding = sum(self.outstanding)
        self.hooks.tick(self.progress)
        if not self.progress.stopping:
            stop = self.hooks.stop_requested()
            if stop:
                raise _StopRun("interrupted")
            failure = self.hooks.failure()
            if failure:
                raise _StopRun(failure)
            gone = [w for w in self.channel.dead() if w not in self.exited]
            if gone and not getattr(self.channel, "tolerates_loss", False):
                raise _StopRun(f"worker process(es) {gone} died unexpectedly")
            for worker in gone:
                self._lose(worker)
            if gone and len(self.lost) == self.workers:
                raise _StopRun(f"every worker was lost ({len(self.lost)}); the load cannot go on")
        return messages

    def _lose(self, worker: int) -> None:
        """A worker died mid-run: its in-flight requests become `worker_lost` records; the rest go on."""
        reason = (getattr(self.channel, "lost", None) or {}).get(worker, "it stopped answering")
        node = (getattr(self.channel, "nodes", None) or [None] * self.workers)[worker]
        rows = [{"request_id": request_id, "worker": worker, "node": node, "phase": phase, "scheduled_at": scheduled,
                 "status": "cancelled", "error_kind": "worker_lost",
                 "error_message": f"load-generator worker {worker} was lost while this request was in flight: {reason}"}
                for request_id, (phase, scheduled) in self.in_flight[worker].items()]
        self.in_flight[worker].clear()
        if rows:
            self.progress.records += len(rows)
            self.progress.errors += len(rows)
            self.hooks.records(rows)
        self.lost.add(worker)
        self.exited.add(worker)
        self.idle.add(worker)
        self.outstanding[worker] = 0
        left = self.workers - len(self.lost)
        self.result.lost_workers.append({"worker": worker, "node": node, "at_s": self.clock(), "reason": reason,
                                         "in_flight_lost": len(rows)})
        self.result.problems.append(
            f"worker {worker}{f' on node {node}' if node else ''} was lost at t={self.clock():.1f} s ({reason}): "
            f"{len(rows)} in-flight request(s) recorded as worker_lost; the run went on with {left} worker(s)")
        self.hooks.notice(self.result.problems[-1])

    def _handle(self, message: Any) -> None:
        if isinstance(message, Started):
            self.in_flight[message.worker].update((rid, (phase, at)) for rid, phase, at in message.requests)
        elif isinstance(message, Records):
            if self.in_flight[message.worker]:
                flying = self.in_flight[message.worker]
                for row in message.rows:
                    flying.pop(row["request_id"], None)
            self.progress.records += len(message.rows)
            for row in message.rows:
                if row.get("status") != "ok":
                    self.progress.errors += 1
                lag = row.get("schedule_lag_s")
                if lag is not None and row.get("phase") != "warmup":
                    self.result.schedule_lags.append(lag)
            self.hooks.records(message.rows)
        elif isinstance(message, Flows):
            self.result.flows += len(message.rows)
            self.hooks.flows(message.rows)
        elif isinstance(message, SessionDone):
            self.outstanding[message.worker] = max(0, self.outstanding[message.worker] - message.count)
            if message.phase == self.progress.phase:
                self.progress.phase_done += message.count
        elif isinstance(message, PhaseIdle):
            if message.phase == self.progress.phase:
                self.idle.add(message.worker)
        elif isinstance(message, LoopLag):
            self.result.loop_lag.append(message)
        elif isinstance(message, WorkerFailed):
            self.result.problems.append(f"worker {message.worker} failed:\n{message.error}")
            self.result.status = "failed"
        elif isinstance(message, Exited):
            self.exited.add(message.worker)
            self.result.cancelled += message.in_flight_cancelled
            self.result.retired_users += message.retired_users
            for notice in message.notices:
                if notice not in self.result.notices:
                    self.result.notices.append(notice)

    def _shutdown(self, message: Any, timeout_s: float) -> None:
        """Tell every worker to finish (Shutdown) or stop (Stop) and collect what they send back."""
        self.progress.stopping = True
        self.channel.broadcast(message)
        forced = False
        deadline = time.monotonic() + timeout_s
        while len(self.exited) < self.workers and time.monotonic() < deadline:
            if not forced and self.hooks.stop_requested() >= 2:
                self.channel.broadcast(Stop(0.0))  # second Ctrl-C: cancel in-flight requests now
                forced = True
            for m in self.channel.poll(POLL_S):
                self._handle(m)
            self.hooks.tick(self.progress)
            if set(self.channel.dead()) - self.exited == set(range(self.workers)) - self.exited:
                break  # every remaining worker is gone without saying goodbye
        missing = set(range(self.workers)) - self.exited
        if missing:
            self.result.problems.append(f"worker(s) {sorted(missing)} did not exit cleanly; their in-flight requests are lost")
