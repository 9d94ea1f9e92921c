"""Replaying agent traces inside a worker process: each trace a flow, each call a measured request.

The worker hands every arriving `ReplayFlow` (workloads/agent_replay.py) to
`ReplayRuntime.run_arrival`, as it hands arriving users to the scripted-user
runtime. A call is due when the last of its parents ended plus its recorded
delay (a call without parents: the flow's scheduled start plus its delay),
measured on the run clock from the parents' real end times, so a slow server
delays the children as it would have delayed the agent. That due time is the
call's `scheduled_at`: any lateness after it is the load generator's own
(`schedule_lag_s`).

Invariants:
* a call starts only after every one of its parents ended (failed or not: the
  replay keeps the recorded load, so a failed call's children still run);
* calls with no path between them in the graph run concurrently;
* a flow's row is written once, when its last call ends or the run stops.
"""

from __future__ import annotations

import asyncio

from servescope.harness.users.runtime import MAX_ERROR_MESSAGE, Host
from servescope.rundir.schema import FlowRecord, RequestRecord
from servescope.workloads.agent_replay import ReplayCall, ReplayFlow


class ReplayRuntime:
    """Runs the replayed traces handed to one worker (the worker's `users` for `--trace` of agent traces)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.flow_tasks: set[asyncio.Task] = set()
        self.retired = 0  # the worker reports scripted users retired early; a replayed trace never retires

    async def run_arrival(self, flow: ReplayFlow, phase: str, at: float) -> None:
        """Run one trace from its scheduled start `at` to its last call, and record it as a flow."""
        if not await self.host.sleep_until(at):
            return
        record = FlowRecord(flow_id=flow.flow_id, user_class=flow.user_class, task=flow.task, user_id=flow.flow_id,
                            worker=self.host.index, phase=phase, scheduled_at=at, start_at=self.host.now())
        task = asyncio.get_running_loop().create_task(self._calls(flow, record, at))
        self.flow_tasks.add(task)
        try:
            await asyncio.wait([task])
        finally:
            self.flow_tasks.discard(task)
        if task.cancelled():
            record.status = "cancelled"
        elif (exc := task.exception()) is not None:  # a harness bug, not the trace's: keep it visible
            record.status, record.error_type = "script_error", type(exc).__name__
            record.error_message = str(exc)[:MAX_ERROR_MESSAGE]
        elif record.failed_calls:
            record.status = "error"
        record.end_at = self.host.now()
        record.duration_s = record.end_at - record.start_at
        self.host.add_flow(record.to_dict())

    def cancel_flows(self) -> None:
        """Stop: cancel every running trace (their calls in flight are cancelled and recorded)."""
        for task in list(self.flow_tasks):
            task.cancel()

    async def _calls(self, flow: ReplayFlow, fr: FlowRecord, start: float) -> None:
        ended = [asyncio.Event() for _ in flow.calls]
        end_at: list[float] = [start] * len(flow.calls)

        async def one(call: ReplayCall) -> None:
            try:
                for parent in call.parents:
                    await ended[parent].wait()
                due = max((end_at[p] for p in call.parents), default=start) + call.delay_s
                if await self.host.sleep_until(due):
                    record = self._record(flow, fr, call, due)
                    await self.host.execute(call.spec, record)
                    fr.calls += 1
                    if record.status != "ok":
                        fr.failed_calls += 1
                    fr.prompt_tokens += call.spec.prompt_tokens
                    fr.output_tokens += record.output_tokens or 0
                    end_at[call.step] = record.end_at if record.end_at is not None else self.host.now()
                else:
                    end_at[call.step] = self.host.now()
            finally:
                ended[call.step].set()  # the run stopping must not leave children waiting forever

        await asyncio.gather(*(one(call) for call in flow.calls))

    def _record(self, flow: ReplayFlow, fr: FlowRecord, call: ReplayCall, due: float) -> RequestRecord:
        spec = call.spec
        return RequestRecord(request_id=spec.request_id, worker=self.host.index, phase=fr.phase,
                             session_id=spec.session_id, api=spec.api, prompt_tokens=spec.prompt_tokens,
                             max_tokens=spec.max_tokens, prompt_bucket=spec.prompt_bucket,
                             output_bucket=spec.output_bucket, scheduled_at=due, user_class=flow.user_class,
                             task=flow.task, flow_id=flow.flow_id, step=call.step)
