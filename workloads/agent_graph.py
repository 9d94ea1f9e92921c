"""Agent traces as graphs of model calls, and the plain JSONL agent-graph format.

An agent trace is one unit of work (a user's request to an agent) that made
several model calls, some after others, some at the same time. Replaying it
keeps that shape: a call waits until every call it depends on has ended, then
its recorded delay, so sequential steps stay sequential and calls that
overlapped in the recording overlap again.

The JSONL agent-graph format, one node (model call) per line:

    {"trace": "t1", "id": "plan", "input_tokens": 900, "output_tokens": 120}
    {"trace": "t1", "id": "search-a", "parents": ["plan"], "delay_s": 0.4, "input_tokens": 1100, "output_tokens": 60}
    {"trace": "t1", "id": "search-b", "parents": ["plan"], "delay_s": 0.4, "input_tokens": 1100, "output_tokens": 60}
    {"trace": "t1", "id": "answer", "parents": ["search-a", "search-b"], "input_tokens": 1400, "output_tokens": 300,
     "model": "gpt-4o", "api": "chat"}

`trace` and `id` (strings or integers) name the node; `parents` lists nodes of
the same trace; `delay_s` is the wait after the last parent ends (a node
without parents: after the trace starts). `trace_start_s` (on any node of the
trace) places the trace on the file's clock; `user_class` and `task` label the
trace's flow. Lines of one trace may be anywhere in the file.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servescope.workloads.errors import WorkloadError
from servescope.workloads.jsonstream import iter_jsonl

APIS = ("chat", "completions")
DEFAULT_USER_CLASS = "trace"
DEFAULT_TASK = "graph"
NODE_KEYS = ("trace", "id", "parents", "input_tokens", "output_tokens", "delay_s", "model", "api",
             "trace_start_s", "user_class", "task")
REQUIRED_KEYS = ("trace", "id", "input_tokens", "output_tokens")


@dataclass(slots=True)
class AgentCall:
    """One recorded model call: what it asked and answered, and what it waited for."""

    call_id: str
    input_tokens: int
    output_tokens: int
    parents: tuple[str, ...] = ()
    delay_s: float = 0.0  # after the last parent ended; a call without parents: after the trace started
    model: str | None = None
    api: str | None = None  # "chat" | "completions"; None: the run's choice


@dataclass(slots=True)
class AgentTrace:
    """One trace: its calls in an order where every parent comes before its children."""

    trace_id: str
    calls: list[AgentCall]
    start_s: float = 0.0  # on the recording's clock; replay keeps the offsets between traces
    user_class: str = DEFAULT_USER_CLASS
    task: str = DEFAULT_TASK
    models: dict[str, int] = field(default_factory=dict)  # recorded model -> calls


def build_trace(trace_id: str, calls: list[AgentCall], source: str, *, start_s: float = 0.0,
                user_class: str = DEFAULT_USER_CLASS, task: str = DEFAULT_TASK) -> AgentTrace:
    """Check the graph (unique ids, known parents, no cycle) and order it parents-first.

    Among calls that are ready at once, the earlier one in `calls` comes first,
    so the order (a call's `step`) follows the recording where it can.
    """
    index: dict[str, int] = {}
    for i, call in enumerate(calls):
        if call.call_id in index:
            raise WorkloadError(f"trace {trace_id!r}: node id {call.call_id!r} appears twice", source=source)
        index[call.call_id] = i
    children: list[list[int]] = [[] for _ in calls]
    waiting = [0] * len(calls)
    for i, call in enumerate(calls):
        for parent in dict.fromkeys(call.parents):
            if parent not in index:
                raise WorkloadError(f"trace {trace_id!r}: node {call.call_id!r} names parent {parent!r}, "
                                    "which is not a node of this trace", source=source)
            children[index[parent]].append(i)
            waiting[i] += 1
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for child in children[i]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    if len(order) < len(calls):
        stuck = [calls[i].call_id for i in range(len(calls)) if waiting[i] > 0]
        raise WorkloadError(f"trace {trace_id!r}: the parent links form a cycle through node(s) "
                            f"{', '.join(map(repr, stuck[:8]))}; a node cannot wait for itself", source=source)
    models: dict[str, int] = {}
    for call in calls:
        if call.model:
            models[call.model] = models.get(call.model, 0) + 1
    return AgentTrace(trace_id, [calls[i] for i in order], start_s, user_class, task, models)


# -- the JSONL agent-graph format --------------------------------------------------------------


def looks_like_agent_graph(record: Any) -> bool:
    """Whether a parsed first line is an agent-graph node (for format detection)."""
    return isinstance(record, dict) and "trace" in record and "id" in record and "input_tokens" in record


def read_agent_graph(path: str | Path) -> list[AgentTrace]:
    """Every trace of a JSONL agent-graph file, checked, in order of their start."""
    path = Path(path)
    source = str(path)
    nodes: dict[str, list[AgentCall]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"line {lineno}"
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected a JSON object (one node per line)", source=source)
        unknown = [k for k in obj if k not in NODE_KEYS]
        if unknown:
            raise WorkloadError.unknown_key(unknown[0], "", NODE_KEYS).within(source=source, prefix=where)
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)}", source=source,
                                allowed=REQUIRED_KEYS)
        trace_id, call_id = _name(obj["trace"], where, "trace", source), _name(obj["id"], where, "id", source)
        call = AgentCall(call_id, _tokens(obj["input_tokens"], where, "input_tokens", source),
                         _tokens(obj["output_tokens"], where, "output_tokens", source),
                         parents=_parents(obj.get("parents", []), where, source),
                         delay_s=_seconds(obj.get("delay_s", 0.0), where, "delay_s", source),
                         model=_optional_text(obj.get("model"), where, "model", source),
                         api=_api(obj.get("api"), where, source))
        nodes.setdefault(trace_id, []).append(call)
        own = meta.setdefault(trace_id, {})
        for key in ("trace_start_s", "user_class", "task"):
            if obj.get(key) is None:
                continue
            value = (_seconds(obj[key], where, key, source) if key == "trace_start_s"
                     else _optional_text(obj[key], where, key, source))
            if own.setdefault(key, value) != value:
                raise WorkloadError(f"{where}: trace {trace_id!r} has {key} {own[key]!r} on an earlier line and "
                                    f"{value!r} here; give one value per trace", source=source)
    if not nodes:
        raise WorkloadError("the agent-graph file has no nodes", source=source)
    traces = [build_trace(trace_id, calls, source, start_s=meta[trace_id].get("trace_start_s", 0.0),
                          user_class=meta[trace_id].get("user_class") or DEFAULT_USER_CLASS,
                          task=meta[trace_id].get("task") or DEFAULT_TASK)
              for trace_id, calls in nodes.items()]
    return sorted(traces, key=lambda t: t.start_s)


def _name(value: Any, where: str, key: str, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise WorkloadError(f"{where}: `{key}` must be a non-empty string or an integer, got {value!r}", source=source)
    return str(value)


def _tokens(value: Any, where: str, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WorkloadError(f"{where}: `{key}` must be a whole number of tokens >= 0, got {value!r}", source=source)
    return value


def _seconds(value: Any, where: str, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise WorkloadError(f"{where}: `{key}` must be a number of seconds >= 0, got {value!r}", source=source)
    return float(value)


def _parents(value: Any, where: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WorkloadError(f"{where}: `parents` must be a list of node ids, got {value!r}", source=source)
    return tuple(_name(p, where, "parents[]", source) for p in value)


def _optional_text(value: Any, where: str, key: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise WorkloadError(f"{where}: `{key}` must be a string, got {value!r}", source=source)
    return value or None


def _api(value: Any, where: str, source: str) -> str | None:
    if value is not None and value not in APIS:
        raise WorkloadError(f"{where}: unknown api {value!r}", source=source, allowed=APIS)
    return value
