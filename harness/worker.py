"""A load-generator worker process: its own event loop, its own StreamingClient.

The worker is fed `harness.loadgen.messages` through a queue-like inbox and
answers through an outbox; it knows nothing about how sessions are chosen or
when a phase ends beyond what those messages say. Per phase it runs either
closed-loop slots (each takes the next job when its session ends) or an
open-loop spawner (each job waits for its own send time, so a slow reply never
delays the next send).

Parsing is kept off the measuring path: a plain session's response is timed
as its bytes arrive and parsed into its record later, a slice at a time
between reads (`_finish_records`), so that hundreds of streams ending together
do not delay the reads of the others. Scripted users read their answers at
once, so their calls are parsed as they end.

Self-check: a sampler measures how late a 10 ms sleep wakes up (event-loop
lag); a busy loop shows up there and in every record's `schedule_lag_s`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import tempfile
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
from servescope.rundir.schema import RequestRecord
from servescope.workloads.types import RequestSpec, Session

LAG_PROBE_S = 0.01  # the sampler's sleep; lag = how much later than this it woke
FLUSH_INTERVAL_S = 0.05  # records leave the worker at least this often...
FLUSH_BATCH = 64  # ...or as soon as this many are waiting
FINISH_SLICE_S = 0.0005  # responses are parsed into records for at most this long between two looks at the sockets
DONE_COALESCE_S = 0.005  # sessions that end within this long of the first are reported in one SessionDone
_END = object()  # end-of-phase marker inside a phase's job queue
CONNECT_BACKOFF_S = 0.05  # a closed-loop user waits this long after a refused connection, doubling...
CONNECT_BACKOFF_MAX_S = 1.0  # ...up to this (the run's TargetDownWatch ends a run whose target is gone)


@dataclass
class WorkerSettings:
    """What a worker needs to start: its ClientConfig arguments and its share of the pool to prewarm."""

    client: dict[str, Any]
    prewarm: int = 1
    # Count output tokens with this tokenizer when the server sends no usage
    # (None with count_tokens=True: the bundled one, exact for the reference engine).
    count_tokens: bool = False
    tokenizer: str | None = None
    users_script: str | None = None  # scripted users: the script's path (imported again in the worker)
    replay: bool = False  # agent-trace replay: the jobs are ReplayFlows (harness/users/replay.py)
    seed: int = 0  # scripted users: each user's rng is seeded from this and its id
    users_source: str | None = None  # the script's text, for a worker on a host without the file (Ray)
    node: str | None = None  # the Ray node this worker runs on (records' `node`); None for local workers
    report_starts: bool = False  # send `Started` batches, so a lost worker's in-flight requests are known
    notices: list[str] = field(default_factory=list)  # said by whatever started the worker, reported at exit


def worker_main(index: int, inbox: Any, outbox: Any, settings: WorkerSettings) -> None:
    """Process entry point (multiprocessing target)."""
    # Ctrl-C reaches the whole process group; only the main process decides what it means.
    # (A worker hosted in a thread, as in a Ray actor, has no signals of its own to set.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop  # optional: a faster loop means less self-inflicted lag
    except ImportError:
        uvloop = None
    worker = Worker(index, inbox, outbox, settings)
    try:
        if uvloop is not None:
            uvloop.run(worker.run())
        else:
            asyncio.run(worker.run())
    except BaseException:  # noqa: BLE001 - report anything, the main process decides
        outbox.put(WorkerFailed(index, traceback.format_exc(limit=20)))
        outbox.put(Exited(index))


def _load_tokenizer(settings: WorkerSettings) -> Any:
    from servescope.workloads.tokenizer import load_tokenizer

    return load_tokenizer(settings.tokenizer, target_is_reference=settings.tokenizer is None)


def _make_client(settings: WorkerSettings, tokenizer: Any) -> Any:
    from servescope.harness.client import ClientConfig, StreamingClient

    kwargs = dict(settings.client)
    if settings.count_tokens:
        # Generated text: no special tokens added (a prompt count adds BOS; an output count must not).
        kwargs["count_tokens"] = lambda text: len(tokenizer.encode_plain(text))
    return StreamingClient(ClientConfig(**kwargs))


def _make_users(worker: "Worker", settings: WorkerSettings, tokenizer: Any) -> Any:
    if settings.replay:
        from servescope.harness.users.replay import ReplayRuntime

        return ReplayRuntime(worker)
    from servescope.harness.users.runtime import UserRuntime
    from servescope.harness.users.script import load_script
    from servescope.workloads.spec import Buckets

    path = settings.users_script
    if settings.users_source is not None and not os.path.isfile(path):  # another host: the driver sent the text
        folder = tempfile.mkdtemp(prefix="servescope-users-")
        path = os.path.join(folder, os.path.basename(path))
        with open(path, "w", encoding="utf-8") as f:
            f.write(settings.users_source)
    return UserRuntime(worker, load_script(path), tokenizer, settings.seed, Buckets())


class Worker:
    """One worker's state: the client, the phase in progress and what is in flight."""

    def __init__(self, index: int, inbox: Any, outbox: Any, settings: WorkerSettings) -> None:
        self.index = index
        self.inbox = inbox
        self.outbox = outbox
        self.settings = settings
        self.origin = float(settings.client["clock_origin"])
        self.client: Any = None
        self.users: Any = None  # UserRuntime when the run drives scripted users
        self.rows: list[dict[str, Any]] = []
        self.flow_rows: list[dict[str, Any]] = []
        self.started: list[tuple[str, str, float | None]] = []  # report_starts: requests sent since the last flush
        self.lags = array("d")
        self.stopping = False
        self.waiting: set[asyncio.Task] = set()  # sessions sleeping until their next send
        self.executing: dict[asyncio.Task, RequestRecord] = {}
        self.to_finish: deque[tuple[RequestRecord, Any]] = deque()  # (record, Exchange): ended, not yet parsed
        self.finish_wakeup = asyncio.Event()
        self.done: dict[str, int] = {}  # phase -> sessions ended and not yet reported
        self.done_timer: asyncio.TimerHandle | None = None
        self.phase_queues: dict[str, asyncio.Queue] = {}
        self.phase_tasks: set[asyncio.Task] = set()
        self.cancelled = 0
        self.finished = asyncio.Event()

    def now(self) -> float:
        return time.perf_counter() - self.origin

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        needs_tokenizer = self.settings.count_tokens or self.settings.users_script is not None
        tokenizer = _load_tokenizer(self.settings) if needs_tokenizer else None
        self.client = _make_client(self.settings, tokenizer)
        if self.settings.users_script is not None or self.settings.replay:
            self.users = _make_users(self, self.settings, tokenizer)
        t0 = time.perf_counter()
        error = None
        try:
            await self.client.prewarm(max(1, self.settings.prewarm))
        except Exception as exc:  # noqa: BLE001 - an unreachable target still gets a run (with connect errors)
            error = f"{type(exc).__name__}: {exc}"
        # What start-up built (modules, the tokenizer) lives as long as the worker: out of the
        # collector's sight, a full collection during the load walks only what the load made.
        gc.collect()
        gc.freeze()
        self.outbox.put(Ready(self.index, time.perf_counter() - t0, error, self.client.transport_name))
        background = [asyncio.create_task(self._sample_lag()), asyncio.create_task(self._flush_periodically()),
                      asyncio.create_task(self._finish_records())]
        reader = threading.Thread(target=self._read_inbox, args=(loop,), name=f"worker-{self.index}-inbox", daemon=True)
        reader.start()
        await self.finished.wait()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._finish_pending()
        self._flush()
        self.outbox.put(self._lag_summary())
        try:
            await self.client.aclose()
        finally:
            self.outbox.put(Exited(self.index, self.cancelled,
                                   list(getattr(self.client, "notices", [])) + self.settings.notices,
                                   self.users.retired if self.users is not None else 0))

    def _read_inbox(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking reads on the inbox, handed to the event loop in arrival order.

        A daemon thread: it ends with the process (a second Stop may still arrive
        after the first one, so it keeps reading until then).
        """
        while True:
            message = self.inbox.get()
            try:
                loop.call_soon_threadsafe(self._on_message, message)
            except RuntimeError:  # the loop has closed: the worker is exiting
                return

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Job):
            queue = self.phase_queues.get(message.phase)
            if queue is None or self.stopping:
                self._session_done(message.phase)
            else:
                queue.put_nowait(message)
        elif isinstance(message, StartPhase):
            queue: asyncio.Queue = asyncio.Queue()
            self.phase_queues[message.phase] = queue
            self._spawn(self._run_phase(message, queue), self.phase_tasks)
        elif isinstance(message, EndPhase):
            queue = self.phase_queues.get(message.phase)
            if queue is not None:
                queue.put_nowait(_END)
        elif isinstance(message, Stop):
            asyncio.get_running_loop().create_task(self._stop(message.grace_s))
        elif isinstance(message, Shutdown) and not self.stopping:
            self.finished.set()

    @staticmethod
    def _spawn(coro: Any, into: set[asyncio.Task]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        into.add(task)
        task.add_done_callback(into.discard)
        return task

    # -- phases -------------------------------------------------------------------------

    async def _run_phase(self, start: StartPhase, queue: asyncio.Queue) -> None:
        if start.slot_starts and start.slot_users:
            await self._user_slots(start, queue)
        elif start.slot_starts:
            slots = [asyncio.create_task(self._slot(queue, at, start.deadline)) for at in start.slot_starts]
            await asyncio.gather(*slots)
        else:
            sessions: set[asyncio.Task] = set()
            while (job := await queue.get()) is not _END:
                run = self._run_arrival(job) if self.users is not None else self._run_session(job.session, job.phase, job.at)
                self._spawn(run, sessions)
            if sessions:
                await asyncio.wait(list(sessions))
        self.phase_queues.pop(start.phase, None)
        self._finish_pending()  # the phase's records and ended sessions are reported before it is idle
        self._flush()
        self.outbox.put(PhaseIdle(self.index, start.phase))

    async def _slot(self, queue: asyncio.Queue, start_at: float, deadline: float | None) -> None:
        """Closed loop: one virtual user. Its next send is due the moment its previous session ended."""
        if not await self._sleep_until(start_at):
            return
        free_since = start_at  # the slot's next send is due now: waiting for a job counts as lag
        refused = 0  # connection failures in a row: a closed loop must not spin on a dead port
        while (job := await queue.get()) is not _END:
            if self.stopping or (deadline is not None and self.now() >= deadline):
                self._session_done(job.phase)
                continue
            last = await self._run_session(job.session, job.phase, free_since)
            refused = refused + 1 if last is not None and last.error_kind == "connect" else 0
            # Back off after refused connections (50 ms doubling to 1 s). The delay moves the
            # next send's scheduled time, so it never shows up as the load generator's lag.
            free_since = self.now() + (min(CONNECT_BACKOFF_MAX_S, CONNECT_BACKOFF_S * 2 ** (refused - 1)) if refused else 0.0)
        queue.put_nowait(_END)  # pass the marker on to the next slot

    async def _user_slots(self, start: StartPhase, queue: asyncio.Queue) -> None:
        """Closed loop with scripted users: one long-lived user per slot.

        A user that retires leaves its jobs to the others; when none is left, the
        queue is drained (each job answered) so the phase still ends."""
        live = [len(start.slot_starts)]

        def done(job: Job) -> None:
            self._session_done(job.phase)

        async def one(at: float, slot: Any) -> None:
            if await self.users.run_slot(queue, _END, at, start.deadline, slot, start.phase, done):
                return
            live[0] -= 1
            if live[0] == 0:
                while (job := await queue.get()) is not _END:
                    done(job)
                queue.put_nowait(_END)

        await asyncio.gather(*(one(at, slot) for at, slot in zip(start.slot_starts, start.slot_users)))

    async def _run_arrival(self, job: Job) -> None:
        """Open loop with scripted users: one arriving user."""
        try:
            await self.users.run_arrival(job.session, job.phase, job.at)
        finally:
            self._session_done(job.phase)

    async def _run_session(self, session: Session, phase: str, at: float) -> RequestRecord | None:
        """Send the session's turns in order: the first at `at`, each next one its think time after the previous ended.

        Returns the record of the last turn sent (None when none was)."""
        scheduled = at
        previous_end = scheduled
        record = None
        for number, spec in enumerate(session.turns):
            if number > 0:
                scheduled = previous_end + spec.think_time_s
            if not await self._sleep_until(scheduled):
                break
            record = self._new_record(spec, phase, scheduled)
            await self._execute(spec, record, deferred=True)
            previous_end = record.end_at if record.end_at is not None else self.now()
        self._session_done(phase)
        return record

    # -- what scripted users ask of their worker (harness.users.runtime.Host) ----------------

    async def sleep_until(self, at: float) -> bool:
        return await self._sleep_until(at)

    async def execute(self, spec: RequestSpec, record: RequestRecord, reply: Any = None,
                      finalize: Callable[[RequestRecord], None] | None = None) -> None:
        await self._execute(spec, record, reply, finalize=finalize)

    def add_flow(self, row: dict[str, Any]) -> None:
        row["node"] = self.settings.node
        self.flow_rows.append(row)

    async def _sleep_until(self, at: float) -> bool:
        """Sleep until run-clock time `at`; False when the run was stopped meanwhile."""
        if self.stopping:
            return False
        delay = at - self.now()
        if delay > 0:
            task = asyncio.current_task()
            self.waiting.add(task)
            try:
                # The loop's timers have millisecond resolution and may fire a little
                # early: sleep again for what is left so no request goes out before its time.
                while delay > 0 and not self.stopping:
                    await asyncio.sleep(delay)
                    delay = at - self.now()
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
                return False
            finally:
                self.waiting.discard(task)
        return not self.stopping

    # -- one request ----------------------------------------------------------------------

    def _new_record(self, spec: RequestSpec, phase: str, scheduled: float) -> RequestRecord:
        return RequestRecord(
            request_id=spec.request_id, worker=self.index, phase=phase,
            session_id=spec.session_id, turn=spec.turn, tenant=spec.tenant,
            prefix_group=spec.prefix_group, prompt_bucket=spec.prompt_bucket,
            output_bucket=spec.output_bucket, api=spec.api,
            prompt_tokens=spec.prompt_tokens, max_tokens=spec.max_tokens,
            scheduled_at=scheduled,
        )

    async def _execute(self, spec: RequestSpec, record: RequestRecord, reply: Any = None, deferred: bool = False,
                       finalize: Callable[[RequestRecord], None] | None = None) -> None:
        """Send one request and record it. `deferred`: a response that ended without a failure is
        parsed later by `_finish_records`; until then its record holds only its labels and `end_at`.
        `finalize(record)` runs once the response is parsed, before the record becomes a row."""
        if self.settings.report_starts:
            self.started.append((record.request_id, record.phase, record.scheduled_at))
        send = self.client.send(spec, record) if deferred else self.client.execute(spec, record, reply)
        task = asyncio.get_running_loop().create_task(send)
        self.executing[task] = record
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:  # the caller (a scripted flow) was cancelled: the call goes too, recorded
            task.cancel()
            await asyncio.wait([task])
            self._record_outcome(task, record, finalize)
            raise
        finally:
            self.executing.pop(task, None)
        if deferred and not task.cancelled() and task.exception() is None and task.result() is not None:
            ex = task.result()
            if ex.error_kind is None:  # a failure is finished now: a closed-loop slot backs off on `connect`
                if ex.end_at is not None:
                    record.end_at = ex.end_at - self.origin  # the next turn's think time counts from here
                self.to_finish.append((record, ex))
                self.finish_wakeup.set()
                return
            self.client.finish(record, ex)
        self._record_outcome(task, record, finalize)

    async def _finish_records(self) -> None:
        """Parse ended responses into records, FINISH_SLICE_S at a time, letting the loop read between slices."""
        while True:
            await self.finish_wakeup.wait()
            self.finish_wakeup.clear()
            while self.to_finish:
                self._finish_pending(FINISH_SLICE_S)
                await asyncio.sleep(0)

    def _finish_pending(self, budget_s: float | None = None) -> None:
        """Parse waiting responses into records: all of them, or until `budget_s` has passed."""
        deadline = time.perf_counter() + budget_s if budget_s is not None else float("inf")
        while self.to_finish:
            record, ex = self.to_finish.popleft()
            self.client.finish(record, ex)
            self._hand_off(record)
            if time.perf_counter() >= deadline:
                return

    def _record_outcome(self, task: asyncio.Task, record: RequestRecord,
                        finalize: Callable[[RequestRecord], None] | None = None) -> None:
        if task.cancelled():
            self.cancelled += 1
            record.status, record.error_kind = "cancelled", "cancelled"
            record.error_message = record.error_message or "cancelled by Ctrl-C after the grace period"
            if record.end_at is None:
                record.end_at = self.now()
            if record.sent_at is not None and record.e2e_s is None:
                record.e2e_s = record.end_at - record.sent_at
        elif task.exception() is not None:  # the client promises not to raise; keep the request anyway
            exc = task.exception()
            record.status, record.error_kind = "error", "client"
            record.error_message = f"{type(exc).__name__}: {exc}"[:500]
        if finalize is not None:
            finalize(record)
        self._hand_off(record)

    def _hand_off(self, record: RequestRecord) -> None:
        """The finished record joins the next batch to the driver."""
        if record.schedule_lag_s is None and record.sent_at is not None and record.scheduled_at is not None:
            record.schedule_lag_s = record.sent_at - record.scheduled_at
        record.node = self.settings.node
        self.rows.append(record.to_dict())
        if len(self.rows) >= FLUSH_BATCH:
            self._flush()

    # -- stop, flush, self-check ------------------------------------------------------------

    async def _stop(self, grace_s: float) -> None:
        if self.stopping:  # second Ctrl-C: no more grace
            grace_s = 0.0
        self.stopping = True
        for task in list(self.waiting):
            task.cancel()
        for phase, queue in list(self.phase_queues.items()):
            while not queue.empty():
                if queue.get_nowait() is not _END:
                    self._session_done(phase)
            queue.put_nowait(_END)
        if self.executing and grace_s > 0:
            await asyncio.wait(list(self.executing), timeout=grace_s)
        for task in list(self.executing):
            task.cancel()
        if self.users is not None:
            await asyncio.sleep(0)  # let cancelled calls record themselves before their flows go
            self.users.cancel_flows()
        if self.phase_tasks:
            await asyncio.wait(list(self.phase_tasks), timeout=max(1.0, grace_s))
        self._finish_pending()
        self._flush()
        self.finished.set()

    def _session_done(self, phase: str) -> None:
        """Count an ended session; the count goes out DONE_COALESCE_S after the first of a run of them.

        One message per session made every wave of hundreds of streams ending together hundreds of
        queue puts (a lock, a wake-up of the queue's feeder thread, a pickle each) beside the reads."""
        self.done[phase] = self.done.get(phase, 0) + 1
        if self.done_timer is None:
            self.done_timer = asyncio.get_running_loop().call_later(DONE_COALESCE_S, self._report_done)

    def _report_done(self) -> None:
        if self.done_timer is not None:
            self.done_timer.cancel()
            self.done_timer = None
        for phase, count in self.done.items():
            self.outbox.put(SessionDone(self.index, phase, count))
        self.done.clear()

    def _flush(self) -> None:
        if self.started:  # before the records: a request is known to be out before it is known to be done
            started, self.started = self.started, []
            self.outbox.put(Started(self.index, started))
        if self.rows:
            rows, self.rows = self.rows, []
            self.outbox.put(Records(self.index, rows))
        if self.flow_rows:  # after the records: a flow's calls reach the driver no later than the flow
            flows, self.flow_rows = self.flow_rows, []
            self.outbox.put(Flows(self.index, flows))
        self._report_done()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self._flush()

    async def _sample_lag(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            self.lags.append(max(0.0, time.perf_counter() - t0 - LAG_PROBE_S))

    def _lag_summary(self) -> LoopLag:
        if not self.lags:
            return LoopLag(self.index, 0, 0.0, 0.0, 0.0, time.process_time())
        ordered = sorted(self.lags)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]  # nearest rank; no numpy in the worker
        return LoopLag(self.index, len(ordered), ordered[-1], p99, sum(ordered) / len(ordered), time.process_time())
