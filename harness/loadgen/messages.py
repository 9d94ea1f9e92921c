"""What the dispatcher and the workers say to each other (plain picklable dataclasses).

The channel carrying them is anything with `put`/`get` (a multiprocessing
queue today, a Ray queue or a socket tomorrow): neither side depends on how
the other is hosted. Times are seconds on the run clock (`perf_counter()`
minus the run's `clock_origin`, the same in every process on one host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from servescope.workloads.types import Session

# -- dispatcher -> worker ---------------------------------------------------------------


@dataclass(slots=True)
class StartPhase:
    """A phase begins. Closed loop: start one slot at each time in `slot_starts`; open loop: no slots."""

    phase: str
    slot_starts: list[float] = field(default_factory=list)
    deadline: float | None = None  # closed loop: slots start no session after this
    slot_users: list[Any] = field(default_factory=list)  # scripted users: the SlotUser of each slot start


@dataclass(slots=True)
class Job:
    """One session to run. `at`: open-loop send time; None: the next free closed-loop slot sends it.

    Scripted users: `session` is a `UserJob` (a task to run, or an arriving user)."""

    session: Session | Any
    phase: str
    at: float | None = None


@dataclass(slots=True)
class EndPhase:
    """No more jobs for this phase: finish what was handed out, then report `PhaseIdle`."""

    phase: str


@dataclass(slots=True)
class Stop:
    """Interrupt: start nothing new, let in-flight requests finish for `grace_s`, cancel the rest."""

    grace_s: float


@dataclass(slots=True)
class Shutdown:
    """The run is over: report self-check figures and exit."""


# -- worker -> dispatcher ---------------------------------------------------------------


@dataclass(slots=True)
class Ready:
    worker: int
    prewarm_s: float
    error: str | None = None
    transport: str = ""  # the HTTP client the worker's connections use (run.json: prewarm)


@dataclass(slots=True)
class Records:
    """A batch of finished requests (`RequestRecord.to_dict()` rows)."""

    worker: int
    rows: list[dict[str, Any]]


@dataclass(slots=True)
class Started:
    """Requests that went out since the last batch: (request_id, phase, scheduled_at) each.

    Sent only by workers that may be lost (Ray actors): with the records that
    came back, it tells the driver exactly which requests a lost worker had in flight."""

    worker: int
    requests: list[tuple[str, str, float | None]]


@dataclass(slots=True)
class Flows:
    """A batch of finished task invocations of scripted users (`FlowRecord.to_dict()` rows)."""

    worker: int
    rows: list[dict[str, Any]]


@dataclass(slots=True)
class SessionDone:
    """`count` sessions of `phase` ended (a worker reports those that end close together in one message)."""

    worker: int
    phase: str
    count: int = 1


@dataclass(slots=True)
class PhaseIdle:
    worker: int
    phase: str


@dataclass(slots=True)
class LoopLag:
    """Event-loop lag of one worker: how late a 10 ms sleep woke up (s)."""

    worker: int
    samples: int
    max_s: float
    p99_s: float
    mean_s: float
    cpu_s: float = 0.0  # the worker process's CPU seconds, start-up included (client cost per chunk)


@dataclass(slots=True)
class WorkerFailed:
    worker: int
    error: str


@dataclass(slots=True)
class Exited:
    worker: int
    in_flight_cancelled: int = 0
    notices: list[str] = field(default_factory=list)  # what the client learnt about the target (for the console)
    retired_users: int = 0  # scripted users whose on_start failed or who raised StopUser
