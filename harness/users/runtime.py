"""Running scripted users inside a worker process.

The worker owns the event loop, the streaming client, the phase queues and
the stop logic; this module owns users: it creates them, runs `on_start`,
picks tasks by weight, waits their think time, and turns each task
invocation into a flow record. Every call goes through the worker's own
`execute`, so a scripted call is measured exactly like a workload request.

Invariants:
* a task that raises is recorded (`script_error`, with the script's
  file:line) and its user goes on with its next task;
* a user whose `on_start` raises (or raises `StopUser`) is retired and counted;
* a flow's row is written once, when it ends, whatever ended it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from servescope.harness.client.reply import Reply
from servescope.harness.users.client import UserClient
from servescope.harness.users.jobs import SlotUser, UserJob
from servescope.harness.users.response import Response
from servescope.harness.users.script import LoadedScript, script_location
from servescope.harness.users.user import StopUser, User, user_tasks
from servescope.rundir.schema import FlowRecord, RequestRecord
from servescope.workloads.types import RequestSpec

MAX_ERROR_MESSAGE = 500


class Host(Protocol):
    """What the runtime needs from its worker."""

    index: int
    stopping: bool

    def now(self) -> float: ...
    async def sleep_until(self, at: float) -> bool: ...
    async def execute(self, spec: RequestSpec, record: RequestRecord, reply: Reply | None = None,
                      finalize: Any = None) -> None: ...
    def add_flow(self, row: dict[str, Any]) -> None: ...


class TextSource:
    """Token-exact text for `User.prompt` / `User.prefix`, from the run's tokenizer (shared by a worker's users)."""

    def __init__(self, tokenizer: Any) -> None:
        from servescope.workloads.generator import prompt_builder
        from servescope.workloads.prompt_builder import stable_int

        self.tokenizer = tokenizer
        self.builder = prompt_builder(tokenizer)
        self._stable_int = stable_int
        self._prefixes: dict[tuple[str, int], str] = {}

    def prompt(self, tokens: int, rng: random.Random) -> str:
        self._check(tokens, "prompt")
        return self.builder.piece(tokens, rng.choice(self.builder.index.openings), lead=True)

    def prefix(self, group: str, tokens: int) -> str:
        self._check(tokens, "prefix")
        key = (group, tokens)
        if key not in self._prefixes:
            start = self._stable_int("user-prefix", group) % len(self.builder.index)
            self._prefixes[key] = self.builder.piece(tokens, start, lead=True)
        return self._prefixes[key]

    def count(self, api: str, body: dict[str, Any]) -> int | None:
        """The prompt's tokens as the target will count them (chat: the rendered template); None if unknown."""
        try:
            if api == "chat":
                return self.tokenizer.count_chat(body["messages"])
            return self.tokenizer.count(body["prompt"])
        except Exception:  # noqa: BLE001 - a template that refuses tool messages: leave it to usage
            return None

    @staticmethod
    def _check(tokens: int, what: str) -> None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"self.{what}(tokens=...): a whole number of tokens >= 1, got {tokens!r}")


@dataclass
class Flow:
    """One task invocation in progress; its calls number their steps from it."""

    record: FlowRecord
    next_step: int = 0
    tasks: set[asyncio.Task] = field(default_factory=set)

    def take_step(self) -> int:
        step = self.next_step
        self.next_step += 1
        return step


class UserRuntime:
    """Creates and runs the users of one worker process."""

    def __init__(self, host: Host, script: LoadedScript, tokenizer: Any, seed: int,
                 buckets: Any = None) -> None:
        self.host = host
        self.script = script
        self.seed = seed
        self.text = TextSource(tokenizer)
        self.buckets = buckets
        self.flow_tasks: set[asyncio.Task] = set()
        self.retired = 0  # users whose on_start failed or who raised StopUser there
        self._tasks = {name: _TaskTable(cls) for name, cls in script.classes.items()}

    # -- the two load shapes ------------------------------------------------------------------

    async def run_slot(self, queue: asyncio.Queue, end: object, start_at: float, deadline: float | None,
                       slot: SlotUser, phase: str, done: Any) -> bool:
        """Closed loop: one long-lived user taking "run your next task" jobs from `queue`.

        Returns False when the user retired before the phase ended; its jobs stay in the queue
        for the worker's other users (the worker drains the queue when none is left)."""
        if not await self.host.sleep_until(start_at):
            return True
        user = self._new_user(slot.user_class, f"{phase}:u{slot.slot}")
        if not await self._hook(user, "on_start", phase, start_at):
            self.retired += 1
            return False
        due = self.host.now()
        while (job := await queue.get()) is not end:
            if self.host.stopping or (deadline is not None and self.host.now() >= deadline) \
                    or not await self.host.sleep_until(due):
                done(job)
                continue
            retired = await self._run_task(user, phase, due)
            done(job)
            if retired:
                self.retired += 1
                return False
            due = self.host.now() + self._think(user)
        queue.put_nowait(end)  # pass the marker on to the next slot
        await self._hook(user, "on_stop", phase, self.host.now())
        return True

    async def run_arrival(self, job: UserJob, phase: str, at: float) -> None:
        """Open loop: one arriving user: on_start, its class's session_tasks tasks, on_stop."""
        if not await self.host.sleep_until(at):
            return
        user = self._new_user(job.user_class, f"{phase}:a{job.number}")
        if not await self._hook(user, "on_start", phase, at):
            self.retired += 1
            return
        due = at
        for number in range(type(user).session_tasks):
            if number and not await self.host.sleep_until(due):
                return
            if await self._run_task(user, phase, due):
                self.retired += 1
                return
            due = self.host.now() + self._think(user)
        await self._hook(user, "on_stop", phase, self.host.now())

    def cancel_flows(self) -> None:
        """Stop: cancel every running task invocation (their calls were cancelled or finished first)."""
        for task in list(self.flow_tasks):
            task.cancel()

    # -- users, tasks, flows ---------------------------------------------------------------------

    def _new_user(self, class_name: str, user_id: str) -> User:
        cls = self.script.classes[class_name]
        client = UserClient(self, class_name, cls.tenant)
        user = cls(client, random.Random(f"{self.seed}/{user_id}"), user_id, self.text)
        return user

    def _think(self, user: User) -> float:
        wait = type(user).wait_time
        if wait is None:
            return 0.0
        seconds = float(wait(user))  # class attribute: a plain function of the user
        return max(0.0, seconds)

    async def _run_task(self, user: User, phase: str, scheduled: float) -> bool:
        """One task invocation as a flow; True when the task raised StopUser (retire the user)."""
        name, function = self._tasks[type(user).__name__].pick(user.rng)
        return (await self._run_flow(user, name, lambda: function(user), phase, scheduled)) == "stop_user"

    async def _hook(self, user: User, hook: str, phase: str, scheduled: float) -> bool:
        """on_start / on_stop as a flow of their own (recorded when they call the model or fail).

        False when the hook raised (StopUser included): on_start then retires the user."""
        ended = await self._run_flow(user, hook, getattr(user, hook), phase, scheduled, quiet=True)
        return ended not in ("stop_user", "script_error")

    async def _run_flow(self, user: User, name: str, make: Any, phase: str, scheduled: float,
                        quiet: bool = False) -> str:
        """Run `make()` as one flow and record it; returns how it ended: its status, or `stop_user`.

        `quiet`: a flow that made no call and ended well leaves no row (an on_start that only sets state)."""
        user.flows_started += 1
        record = FlowRecord(flow_id=f"{user.user_id}:f{user.flows_started}", user_class=type(user).__name__,
                            task=name, user_id=user.user_id, worker=self.host.index, phase=phase,
                            scheduled_at=scheduled, start_at=self.host.now())
        user.client.flow = Flow(record)
        user.task_started_at = time.perf_counter()
        task = asyncio.get_running_loop().create_task(make())
        self.flow_tasks.add(task)
        try:
            await asyncio.wait([task])
        finally:
            self.flow_tasks.discard(task)
            user.client.flow = None
        ended = None
        if task.cancelled():
            record.status = "cancelled"
        elif isinstance(exc := task.exception(), StopUser):
            ended = "stop_user"
        elif exc is not None:
            record.status = "script_error"
            record.error_type = type(exc).__name__
            record.error_message = str(exc)[:MAX_ERROR_MESSAGE]
            record.error_location = script_location(exc, self.script.path)
        if record.status == "ok" and record.failed_calls:
            record.status = "error"
        record.end_at = self.host.now()
        record.duration_s = record.end_at - record.start_at
        if not (quiet and record.calls == 0 and record.status in ("ok", "cancelled")):
            self.host.add_flow(record.to_dict())
        return ended or record.status

    # -- one call ----------------------------------------------------------------------------------

    async def call(self, flow: Flow, api: str, body: dict[str, Any], max_tokens: int, fields: dict[str, Any],
                   tenant: str | None) -> Response:
        if self.host.stopping:
            raise asyncio.CancelledError("the run is stopping")
        fr = flow.record
        step = flow.take_step()
        spec = RequestSpec(request_id=f"{fr.flow_id}:s{step}", api=api, prompt=body.get("prompt"),
                           messages=body.get("messages"), max_tokens=max_tokens, tenant=tenant, extra_body=fields)
        record = RequestRecord(request_id=spec.request_id, worker=self.host.index, phase=fr.phase, tenant=tenant,
                               api=api, max_tokens=max_tokens, user_class=fr.user_class, task=fr.task,
                               flow_id=fr.flow_id, step=step, session_id=fr.user_id)
        if self.buckets is not None:
            record.output_bucket = self.buckets.output_label(max_tokens)

        def finalize(done: RequestRecord) -> None:
            # The prompt's length as the target counted it (usage), else the run tokenizer's count;
            # taken after the answer, so tokenizing never sits between the script's call and the send.
            done.prompt_tokens = done.usage_prompt_tokens if done.usage_prompt_tokens is not None \
                else self.text.count(api, body)
            if self.buckets is not None and done.prompt_tokens is not None:
                done.prompt_bucket = self.buckets.prompt_label(done.prompt_tokens)

        reply = Reply()
        record.scheduled_at = self.host.now()  # the script asked now: any delay until the send is the framework's
        await self.host.execute(spec, record, reply, finalize)
        fr.calls += 1
        if record.status != "ok":
            fr.failed_calls += 1
        fr.prompt_tokens += record.prompt_tokens or 0
        fr.output_tokens += record.output_tokens or 0
        return Response(record, reply)


class _TaskTable:
    """A class's tasks with their weights, picked with the user's rng."""

    def __init__(self, cls: type[User]) -> None:
        tasks = user_tasks(cls)
        self.names = list(tasks)
        self.functions = [tasks[n][0] for n in self.names]
        self.weights = [tasks[n][1] for n in self.names]

    def pick(self, rng: random.Random) -> tuple[str, Any]:
        if len(self.names) == 1:
            return self.names[0], self.functions[0]
        i = rng.choices(range(len(self.names)), self.weights)[0]
        return self.names[i], self.functions[i]

