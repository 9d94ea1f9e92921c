"""What a workload hands to the load generator.

A `Session` is the unit the load generator schedules (one arrival in an open
loop, one slot in a closed loop). Single-turn traffic is sessions of one turn.
A multi-turn session's turns are sent one after another by the same worker,
each `think_time_s` after the previous turn ended, like a Locust user.

Prompts are built before they are handed over, so sending never waits on
tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestSpec:
    """One request, fully built: the body is ready to serialize."""

    request_id: str
    api: str  # "completions" | "chat"
    prompt: str | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat
    prompt_tokens: int = 0  # length as counted by the harness tokenizer (chat: with template)
    max_tokens: int = 16
    min_tokens: int | None = None  # sent only with --force-output-length
    ignore_eos: bool = False  # sent only with --force-output-length
    tenant: str | None = None
    prefix_group: str | None = None
    prefix_tokens: int = 0  # exact length of the shared prefix (0: none)
    prompt_bucket: str | None = None
    output_bucket: str | None = None
    session_id: str | None = None
    turn: int | None = None
    think_time_s: float = 0.0  # wait after the previous turn of the session ended
    labels: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into the JSON body


@dataclass(slots=True)
class Session:
    """A unit of scheduling: one or more turns sent in order."""

    session_id: str
    turns: list[RequestSpec]
    arrival_s: float | None = None  # trace replay: recorded offset from the trace start
