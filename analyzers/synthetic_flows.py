"""Synthetic run directories of scripted users: calls in requests.parquet, task invocations in flows.parquet.

Three task shapes, as the bundled example scripts make them:
- `Agent.tool_loop`: AGENT_STEPS calls in sequence with tool time between
  them; each call's prompt is the previous context plus the last answer and
  the tool result, and the server's prefix cache holds that previous context;
- `Planner.fan_out`: a plan call, FAN_OUT calls in parallel (their own steps),
  then a join call once the slowest of them is back;
- `Chat.ask`: two calls in sequence with a short pause.
Every component (each call's TTFT and per-token time, each pause) has its own
log-normal noise, so a run without a planted fault has a tail spread evenly
over its parts. `slow_step` plants one: in `slow_share` of that task's flows
the call at that step is `slow_factor` times slower; `slow_between` plants
the other kind, a task whose pauses between calls (tools, the script's own
work) are `slow_factor` times longer. Steps count from 0, as the user runtime numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servescope.rundir.writer import write_run_dir

AGENT_STEPS = 3
FAN_OUT = 3
SYSTEM_PREFIX_TOKENS = 256
TASKS = (("Agent", "tool_loop", 0.5), ("Planner", "fan_out", 0.3), ("Chat", "ask", 0.2))
SCRIPT_ERROR = ("KeyError", "'tool_calls'", "agent_script.py:42")


@dataclass
class ScriptedSpec:
    flows: int = 600
    rate: float = 10.0  # flow starts per second (Poisson)
    seed: int = 0
    slow_step: tuple[str, int] | None = None  # (task, step) slowed in slow_share of that task's flows
    slow_between: str | None = None  # task whose pauses between calls are slowed in slow_share of its flows
    slow_share: float = 0.08
    slow_factor: float = 8.0
    call_error_rate: float = 0.0  # calls that fail with a 5xx (their flow ends `error`)
    script_error_rate: float = 0.0  # Agent flows whose script raises after the first call
    warmup: int = 0  # leading flows labelled phase=warmup

    def __post_init__(self) -> None:
        if self.flows < 1 or self.rate <= 0 or not 0 <= self.slow_share <= 1 or self.slow_factor <= 0:
            raise ValueError(f"invalid scripted spec {self}")
        if not 0 <= self.call_error_rate < 1 or not 0 <= self.script_error_rate < 1 or self.warmup < 0:
            raise ValueError(f"invalid scripted spec {self}")


class _Builder:
    """Lays out one run's calls and flows on a timeline."""

    def __init__(self, spec: ScriptedSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.calls: list[dict[str, Any]] = []
        self.flows: list[dict[str, Any]] = []

    def call(self, flow: dict[str, Any], step: int, sent: float, prompt: int, cached: int, slow: bool) -> dict[str, Any]:
        """One streamed call of a flow sent at `sent`; returns its request row."""
        rng, spec = self.rng, self.spec
        factor = spec.slow_factor if slow else 1.0
        out = int(rng.integers(24, 64))
        ttft = (0.02 + (prompt - cached) * 2e-5) * rng.lognormal(0, 0.3) * factor
        tpot = 0.012 * rng.lognormal(0, 0.2) * factor
        gaps = (tpot * rng.lognormal(0, 0.1, out - 1)).tolist()
        failed = rng.random() < spec.call_error_rate
        row: dict[str, Any] = {
            "request_id": f"req-{len(self.calls):06d}", "worker": flow["worker"], "phase": flow["phase"], "api": "chat",
            "prompt_tokens": prompt, "max_tokens": 64, "scheduled_at": sent, "sent_at": sent, "schedule_lag_s": 0.0002,
            "user_class": flow["user_class"], "task": flow["task"], "flow_id": flow["flow_id"], "step": step,
            "usage_prompt_tokens": prompt, "cached_tokens": cached, "output_tokens_source": "usage",
        }
        if failed:
            row.update(status="error", end_at=sent + 0.005, error_kind="http_5xx", http_status=503, error_message="overloaded")
        else:
            first = sent + ttft
            end = first + float(np.sum(gaps))
            row.update(status="ok", first_token_at=first, end_at=end, ttft_s=ttft, e2e_s=end - sent,
                       tpot_s=(end - first) / (out - 1), itl_s=gaps, chunk_tokens=[1] * len(gaps), output_tokens=out)
        self.calls.append(row)
        flow["calls"] += 1
        flow["failed_calls"] += int(failed)
        flow["prompt_tokens"] += prompt
        flow["output_tokens"] += 0 if failed else out
        return row

    def pause(self, flow: dict[str, Any], median_s: float, planted: bool) -> float:
        factor = self.spec.slow_factor if planted and self.spec.slow_between == flow["task"] else 1.0
        return median_s * float(self.rng.lognormal(0, 0.3)) * factor

    def slowed(self, task: str, step: int, planted: bool) -> bool:
        return planted and self.spec.slow_step == (task, step)

    def tool_loop(self, flow: dict[str, Any], t: float, planted: bool) -> float:
        context = SYSTEM_PREFIX_TOKENS + int(self.rng.integers(64, 256))
        cached = SYSTEM_PREFIX_TOKENS
        for step in range(AGENT_STEPS):
            row = self.call(flow, step, t, context, cached, self.slowed("tool_loop", step, planted))
            t = row["end_at"]
            if step == 0 and self.rng.random() < self.spec.script_error_rate:
                flow["status"] = "script_error"
                flow["error_type"], flow["error_message"], flow["error_location"] = SCRIPT_ERROR
                return t
            if step < AGENT_STEPS - 1:
                tool_tokens = int(self.rng.integers(64, 192))
                cached = context
                context += (row.get("output_tokens") or 0) + tool_tokens
                t += self.pause(flow, 0.08, planted)  # the tool runs
        return t

    def fan_out(self, flow: dict[str, Any], t: float, planted: bool) -> float:
        plan = self.call(flow, 0, t, SYSTEM_PREFIX_TOKENS + 128, SYSTEM_PREFIX_TOKENS, self.slowed("fan_out", 0, planted))
        t = plan["end_at"] + self.pause(flow, 0.01, planted)
        parts = [self.call(flow, 1 + i, t + 0.0005 * i, SYSTEM_PREFIX_TOKENS + 96, SYSTEM_PREFIX_TOKENS,
                           self.slowed("fan_out", 1 + i, planted)) for i in range(FAN_OUT)]
        t = max(p["end_at"] for p in parts) + self.pause(flow, 0.01, planted)
        join = self.call(flow, 1 + FAN_OUT, t, SYSTEM_PREFIX_TOKENS + 320, SYSTEM_PREFIX_TOKENS,
                         self.slowed("fan_out", 1 + FAN_OUT, planted))
        return join["end_at"]

    def ask(self, flow: dict[str, Any], t: float, planted: bool) -> float:
        first = self.call(flow, 0, t, 200, 0, self.slowed("ask", 0, planted))
        t = first["end_at"] + self.pause(flow, 0.05, planted)
        second = self.call(flow, 1, t, 200 + (first.get("output_tokens") or 0) + 16, 200, self.slowed("ask", 1, planted))
        return second["end_at"]

    def build(self) -> None:
        spec, rng = self.spec, self.rng
        starts = np.cumsum(rng.exponential(1 / spec.rate, spec.flows))
        kinds = rng.choice(len(TASKS), spec.flows, p=[w for _, _, w in TASKS])
        for i, (start, kind) in enumerate(zip(starts, kinds)):
            user_class, task, _ = TASKS[kind]
            flow: dict[str, Any] = {
                "flow_id": f"flow-{i:06d}", "user_class": user_class, "task": task, "user_id": f"{user_class}-{i % 16}",
                "worker": i % 4, "phase": "warmup" if i < spec.warmup else "users=16", "scheduled_at": float(start),
                "start_at": float(start), "calls": 0, "failed_calls": 0, "prompt_tokens": 0, "output_tokens": 0,
                "status": "ok",
            }
            planted = rng.random() < spec.slow_share
            end = getattr(self, task)(flow, float(start), planted)
            flow["end_at"] = end
            flow["duration_s"] = end - flow["start_at"]
            if flow["status"] == "ok" and flow["failed_calls"]:
                flow["status"] = "error"
            self.flows.append(flow)


def scripted_rows(spec: ScriptedSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(request rows, flow rows) of one synthetic scripted run."""
    builder = _Builder(spec)
    builder.build()
    return builder.calls, builder.flows


def write_scripted_run(out_dir: str | Path, spec: ScriptedSpec) -> Path:
    """A complete run directory with flows (run.json, requests.parquet, flows.parquet)."""
    calls, flows = scripted_rows(spec)
    run = {
        "status": "complete",
        "command": f"synthetic scripted --flows {spec.flows} --rate {spec.rate} --seed {spec.seed}",
        "target": "synthetic://",
        "model": "synthetic",
        "seed": spec.seed,
        "load": {"kind": "users", "users": 16, "rate": spec.rate},
        "tokenizer": {"name": "bundled", "exact_for_target": True},
        "client": {"loop_lag_max_s": 0.002},
    }
    return write_run_dir(out_dir, run, calls, flows=flows)
