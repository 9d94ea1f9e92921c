"""What a response said, for callers that use the answer (scripted users), not only its timings.

The plain load path never builds one: the record's columns are all a
bucketed workload needs. A `Reply` is filled by `harness.client.outcome`
after the stream ended, from the same parsed events, so keeping the text
costs no second parse and no measured time.

Streamed tool calls arrive as `delta.tool_calls` fragments keyed by `index`:
the first fragment of a call carries its `id`, `type` and function `name`,
later ones append to `function.arguments`. `ToolCall`s are assembled in
index order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolCall:
    """One assembled tool call: `arguments` is the JSON text the model wrote (maybe invalid JSON)."""

    id: str | None
    name: str
    arguments: str = ""
    type: str = "function"

    def parsed_arguments(self) -> Any:
        """`arguments` decoded as JSON; ValueError (with the text) when the model wrote something else."""
        try:
            return json.loads(self.arguments) if self.arguments else {}
        except ValueError as exc:
            raise ValueError(f"tool call {self.name!r}: arguments are not JSON ({exc}): {self.arguments[:200]!r}") from None

    def to_message(self) -> dict[str, Any]:
        """The OpenAI shape, for the assistant message that goes back into the conversation."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class Reply:
    """The answer's content: text, reasoning, tool calls, finish reason, usage."""

    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    _calls: dict[int, ToolCall] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [self._calls[i] for i in sorted(self._calls)]

    def add_choice(self, choice: dict[str, Any], chat: bool) -> None:
        """Fold one choice of a chunk (or of a whole non-streamed answer) into the reply."""
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        if not chat:
            if choice.get("text"):
                self.parts.append(choice["text"])
            return
        delta = choice.get("delta") or choice.get("message") or {}
        if delta.get("content"):
            self.parts.append(delta["content"])
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            self.reasoning_parts.append(reasoning)
        for position, fragment in enumerate(delta.get("tool_calls") or ()):
            self._add_tool_fragment(position, fragment)

    def _add_tool_fragment(self, position: int, fragment: dict[str, Any]) -> None:
        index = fragment.get("index", position)
        function = fragment.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = ToolCall(fragment.get("id"), function.get("name") or "",
                                                 type=fragment.get("type") or "function")
        else:
            call.id = call.id or fragment.get("id")
            if function.get("name") and not call.name:
                call.name = function["name"]
        if function.get("arguments"):
            call.arguments += function["arguments"]
