"""`--trace FILE`: tell which kind of trace a file is, and open it for replay.

Two kinds of trace replay:
- request traces (BurstGPT CSV, Mooncake JSONL): one independent request per
  record at its recorded time (workloads/traces.py);
- agent traces (OpenTelemetry GenAI spans as an OTLP JSON export, or the
  JSONL agent-graph format): one flow per trace, its calls replayed with the
  trace's structure (workloads/agent_graph.py, otel_spans.py, agent_replay.py).

Detection reads the file name and the first record: `.csv` is BurstGPT; a
`.json` document or `.jsonl` line with `resourceSpans` is OTLP; a `.jsonl`
line with `timestamp`/`input_length`/`output_length` is Mooncake; one with
`trace`/`id`/`input_tokens` is an agent graph. `--trace-format` says it
outright when a file could be read either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servescope.workloads.agent_graph import looks_like_agent_graph, read_agent_graph
from servescope.workloads.agent_replay import describe_traces, replay_flows
from servescope.workloads.errors import WorkloadError
from servescope.workloads.jsonstream import first_record
from servescope.workloads.otel_spans import looks_like_otlp, read_otel_spans
from servescope.workloads.tokenizer import PromptTokenizer
from servescope.workloads.traces import MOONCAKE_FIELDS, trace_sessions

TRACE_FORMATS = ("auto", "burstgpt", "mooncake", "otel", "agent-graph")
AGENT_FORMATS = ("otel", "agent-graph")
_SHAPES = ("*.csv: BurstGPT", "*.jsonl lines with timestamp/input_length/output_length: Mooncake",
           "*.json or *.jsonl with resourceSpans: OTLP GenAI spans",
           "*.jsonl lines with trace/id/input_tokens/output_tokens: agent graph")


@dataclass
class TraceReplay:
    """An opened trace: `jobs` for the dispatcher (Sessions, or ReplayFlows for agent traces)."""

    format: str
    jobs: Iterator[Any]
    meta: dict[str, Any]  # run.json's `workload`

    @property
    def flows(self) -> bool:
        return self.format in AGENT_FORMATS


def detect_trace_format(path: str | Path) -> str:
    """The format of a trace file, from its name and first record; a clear error when it is none of them."""
    path = Path(path)
    if path.suffix == ".csv":
        return "burstgpt"
    if path.suffix == ".json":
        if looks_like_otlp(_json_head(path)):
            return "otel"
    elif path.suffix in (".jsonl", ".ndjson"):
        first = first_record(path)
        if looks_like_otlp(first):
            return "otel"
        if isinstance(first, dict) and all(k in first for k in MOONCAKE_FIELDS):
            return "mooncake"
        if looks_like_agent_graph(first):
            return "agent-graph"
    raise WorkloadError("cannot tell what kind of trace this is (pass --trace-format if it is one of these)",
                        source=str(path), allowed=_SHAPES)


def open_trace(path: str | Path, tokenizer: PromptTokenizer, seed: int, speed: float = 1.0, *,
               fmt: str = "auto", api: str | None = None, force_output_length: bool = False) -> TraceReplay:
    """Read and check the whole trace now (bad files fail before any load), replay it lazily.

    Agent traces always force their recorded output lengths; request traces do with
    `force_output_length`.
    """
    if fmt not in TRACE_FORMATS:
        raise WorkloadError(f"unknown trace format {fmt!r}", source=str(path), allowed=TRACE_FORMATS)
    if not Path(path).is_file():
        raise WorkloadError("trace file not found", source=str(path))
    fmt = detect_trace_format(path) if fmt == "auto" else fmt
    meta: dict[str, Any] = {"trace": str(path), "trace_format": fmt, "trace_speed": speed}
    if fmt not in AGENT_FORMATS:
        sessions = trace_sessions(path, tokenizer, seed, speed=speed, fmt=fmt, api=api or "completions",
                                  force_output_length=force_output_length)
        return TraceReplay(fmt, sessions, meta)
    traces = read_otel_spans(path) if fmt == "otel" else read_agent_graph(path)
    meta.update(describe_traces(traces))
    return TraceReplay(fmt, replay_flows(traces, tokenizer, seed, speed, api=api), meta)


def _json_head(path: Path) -> Any:
    """The parsed document of a .json file, or None when it is not JSON (it is read whole: OTLP is one object)."""
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
