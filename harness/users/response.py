"""What a call returns to a user script: the answer and its measurement.

A failed call never raises into the script: it returns a `Response` with
`ok == False` and `error` set, and the flow is recorded as `error`. Scripts
that want an exception call `raise_for_status()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from servescope.harness.client.reply import Reply, ToolCall
from servescope.rundir.schema import RequestRecord


class CallError(Exception):
    """Raised by `Response.raise_for_status()` for a call that did not succeed."""

    def __init__(self, response: "Response") -> None:
        self.response = response
        record = response.record
        where = f"HTTP {record.http_status}" if record.http_status else record.error_kind or record.status
        super().__init__(f"{record.api} call {record.request_id} failed ({where}): {response.error}")


@dataclass(slots=True)
class Response:
    """One call's outcome: `text`, `tool_calls`, `finish_reason`, `usage`, `ok`, `error` and its `record`."""

    record: RequestRecord
    reply: Reply

    @property
    def ok(self) -> bool:
        return self.record.status == "ok"

    @property
    def error(self) -> str | None:
        if self.ok:
            return None
        return self.record.error_message or self.record.error_kind or self.record.status

    @property
    def status_code(self) -> int | None:
        return self.record.http_status

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def reasoning(self) -> str:
        return self.reply.reasoning

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.reply.tool_calls

    @property
    def finish_reason(self) -> str | None:
        return self.reply.finish_reason

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.reply.usage

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message to append to a conversation (with its tool calls, if any)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reply.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.reply.tool_calls]
        return message

    def raise_for_status(self) -> "Response":
        if not self.ok:
            raise CallError(self)
        return self
