"""`UserClient`: what `self.client` is in a user script.

`chat(...)` and `completions(...)` take the OpenAI request fields (messages or
prompt, max_tokens, temperature, tools, tool_choice, response_format, and any
other field, passed through as given), stream (unless the run says
`--no-stream`), and return a `Response`. Each call is one row of
requests.parquet, labelled with the user's class, the task, the flow and the
call's step in it. A call made while the run is stopping raises
`asyncio.CancelledError`, which ends the flow as `cancelled`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from servescope.harness.users.response import Response

if TYPE_CHECKING:
    from servescope.harness.users.runtime import Flow, UserRuntime

DEFAULT_MAX_TOKENS = 128  # what a call asks for without max_tokens (a server's default may be its context length)
_RUN_OWNED = ("stream", "stream_options")  # set by the run (--stream/--no-stream), never by a call


class UserClient:
    """One per user; a task's calls (also parallel ones) belong to the flow it is running."""

    def __init__(self, runtime: "UserRuntime", user_class: str, tenant: str | None) -> None:
        self._runtime = runtime
        self._user_class = user_class
        self._tenant = tenant
        self.flow: "Flow | None" = None  # set by the runtime while a task (or on_start/on_stop) runs

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None, **fields: Any) -> Response:
        """POST /v1/chat/completions with `messages` and any other OpenAI fields."""
        if not isinstance(messages, list) or not messages:
            raise TypeError("chat(messages=...): give a non-empty list of {'role': ..., 'content': ...} dicts")
        return await self._call("chat", {"messages": messages}, max_tokens, fields)

    async def completions(self, prompt: str, *, max_tokens: int | None = None, **fields: Any) -> Response:
        """POST /v1/completions with `prompt` and any other OpenAI fields."""
        if not isinstance(prompt, str):
            raise TypeError(f"completions(prompt=...): the prompt must be a string, got {type(prompt).__name__}")
        return await self._call("completions", {"prompt": prompt}, max_tokens, fields)

    async def _call(self, api: str, body: dict[str, Any], max_tokens: int | None, fields: dict[str, Any]) -> Response:
        owned = [name for name in _RUN_OWNED if name in fields]
        if owned:
            raise TypeError(f"{', '.join(owned)}: set by the run (--stream/--no-stream), not per call")
        if max_tokens is None:
            max_tokens = fields.pop("max_completion_tokens", DEFAULT_MAX_TOKENS)
        if self.flow is None:
            raise RuntimeError("self.client is used outside a task: call the model from @task, on_start or on_stop")
        return await self._runtime.call(self.flow, api, body, int(max_tokens), fields, self._tenant)
