"""Agent traces -> replay flows: one flow per trace, one token-exact request per call.

A `ReplayFlow` is what the dispatcher hands a worker for one trace (it has
`arrival_s`, like a trace session); the worker runs its calls as the graph
says (harness/users/replay.py). Everything here is built in the main process,
so a worker only waits and sends.

Prompts: each call's prompt has exactly its recorded input tokens (as the
run's tokenizer counts them, chat template included) and asks for exactly its
recorded output tokens (min_tokens = max_tokens, ignore_eos), at least one.
A call continues its first parent's prompt: its text starts with the parent's
whole blocks of `BLOCK_TOKENS` tokens and goes on with its own, the way an
agent re-sends its growing context, so a server's prefix cache sees the
sharing a real agent gives it. Sibling calls share their parent's prefix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from servescope.workloads.agent_graph import AgentTrace
from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import apply_output_length, prompt_builder
from servescope.workloads.prompt_builder import stable_int
from servescope.workloads.spec import Buckets
from servescope.workloads.tokenizer import PromptTokenizer
from servescope.workloads.traces import Synthesizer
from servescope.workloads.types import RequestSpec

BLOCK_TOKENS = 64  # granularity of the prompt text a call shares with its parent
DEFAULT_API = "chat"  # agent traffic is chat; a trace's own api, or --api, decides otherwise


@dataclass(slots=True)
class ReplayCall:
    """One call of a replayed trace; `parents` and `step` index the flow's `calls`."""

    step: int
    node: str  # the node id (OTel: the span id)
    parents: tuple[int, ...]
    delay_s: float  # after the last parent ends (none: after the flow's scheduled start), already / speed
    spec: RequestSpec
    model: str | None = None  # the recorded model (the request goes to the run's model)


@dataclass(slots=True)
class ReplayFlow:
    """One trace to replay. `arrival_s`: its start, from the first trace's start, already / speed."""

    flow_id: str
    user_class: str
    task: str
    calls: list[ReplayCall]
    arrival_s: float = 0.0


def replay_flows(traces: list[AgentTrace], tokenizer: PromptTokenizer, seed: int, speed: float = 1.0, *,
                 api: str | None = None, force_output_length: bool = True,
                 buckets: Buckets | None = None) -> Iterator[ReplayFlow]:
    """The flows of `traces` (ordered by start), built one at a time as the dispatcher asks."""
    if not (speed > 0 and math.isfinite(speed)):
        raise WorkloadError(f"speed must be a number > 0, got {speed}", field="speed")
    builder = prompt_builder(tokenizer)
    synths = {name: Synthesizer(builder, name, BLOCK_TOKENS) for name in ("chat", "completions")}
    buckets = buckets or Buckets()
    first = traces[0].start_s if traces else 0.0
    for trace in traces:
        step_of = {call.call_id: step for step, call in enumerate(trace.calls)}
        blocks: list[list[int]] = []
        calls = []
        for step, call in enumerate(trace.calls):
            parents = tuple(step_of[p] for p in dict.fromkeys(call.parents))
            inherited = blocks[parents[0]] if parents else []
            own = [stable_int(seed, "agent-block", trace.trace_id, call.call_id, k)
                   for k in range(call.input_tokens // BLOCK_TOKENS + 1)]
            blocks.append(inherited + own)
            call_api = api or call.api or DEFAULT_API
            body, tokens = synths[call_api].prompt(call.input_tokens, blocks[-1], stable_int(seed, trace.trace_id, step))
            out = max(1, call.output_tokens)
            spec = RequestSpec(request_id=f"{trace.trace_id}:s{step}", api=call_api, prompt_tokens=tokens,
                               session_id=trace.trace_id, prompt_bucket=buckets.prompt_label(tokens),
                               output_bucket=buckets.output_label(out), **body)
            apply_output_length(spec, out, force_output_length)
            calls.append(ReplayCall(step, call.call_id, parents, call.delay_s / speed, spec, call.model))
        yield ReplayFlow(trace.trace_id, trace.user_class, trace.task, calls, (trace.start_s - first) / speed)


def describe_traces(traces: list[AgentTrace]) -> dict[str, object]:
    """What run.json says about the replayed traces: counts, and calls per recorded model."""
    models: dict[str, int] = {}
    for trace in traces:
        for name, calls in trace.models.items():
            models[name] = models.get(name, 0) + calls
    return {"traces": len(traces), "calls": sum(len(t.calls) for t in traces),
            "max_calls_per_trace": max((len(t.calls) for t in traces), default=0),
            "recorded_models": dict(sorted(models.items()))}
