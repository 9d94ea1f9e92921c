"""OpenAI request bodies in, OpenAI response shapes out (completions and chat, streaming or not).

Every field is type-checked by hand against the few types the API allows and
a wrong one raises `InvalidRequest` naming the field, which the server turns
into OpenAI's 400 body. (A schema library would add a dependency for a dozen
fields; the checks below are the whole schema.)

Usage extension: besides `prompt_tokens_details.cached_tokens`, usage carries
`spec_accepted_tokens` and `spec_draft_tokens` when speculative decoding is on.

Tool calls: a chat request whose `tool_choice` names a function (or is
`"required"`: the first of `tools`) is answered as a call to that function,
streamed as OpenAI streams one: the first chunk carries the call's id, type
and name, the generated text follows as `arguments` fragments, and the answer
ends with finish_reason `tool_calls`. The arguments are the model's own text,
not constrained to JSON (no guided decoding): with random weights they are
noise, but a client's tool-call handling runs over the real protocol.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from servescope.reference_engine.errors import InvalidRequest
from servescope.reference_engine.sequence import SamplingParams, Sequence


@dataclass(slots=True)
class ParsedRequest:
    api: str  # "completions" | "chat"
    model: str
    prompt: str | list[int] | None
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    tenant: str
    tool: str | None = None  # chat: answer as a call to this function (tool_choice)


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python, but `"max_tokens": true` is a client bug worth reporting.
    if isinstance(value, bool) and bool not in types:
        raise InvalidRequest(f"'{name}' must be {what}, got a boolean", name)
    if not isinstance(value, types):
        raise InvalidRequest(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**message, "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise InvalidRequest("'prompt' must be a string or a non-empty list of token ids (one prompt per request)",
                         "prompt")


def parse_request(body: Any, api: str, header_tenant: str | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = _typed(body, "model", (str,), "", "a string")
    n = _typed(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise InvalidRequest("only n=1 is supported", "n")
    if api == "chat":
        messages, prompt = _messages(body), None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        messages, prompt = None, _prompt(body)
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise InvalidRequest(f"'max_tokens' must be an integer, got {type(max_tokens).__name__}", "max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    elif stop is not None:
        raise InvalidRequest("'stop' must be a string or a list of strings", "stop")
    stream_options = _typed(body, "stream_options", (dict,), {}, "an object")
    tenant = _typed(body, "tenant", (str,), None, "a string")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16,
        min_tokens=_typed(body, "min_tokens", (int,), 0, "an integer"),
        temperature=float(_typed(body, "temperature", (int, float), 1.0, "a number")),
        top_p=float(_typed(body, "top_p", (int, float), 1.0, "a number")),
        top_k=_typed(body, "top_k", (int,), -1, "an integer"),
        seed=_typed(body, "seed", (int,), None, "an integer"),
        ignore_eos=_typed(body, "ignore_eos", (bool,), False, "a boolean"),
        stop=stop or (),
    )
    return ParsedRequest(
        api=api, model=model, prompt=prompt, messages=messages, params=params,
        tool=_forced_tool(body) if api == "chat" else None,
        stream=_typed(body, "stream", (bool,), False, "a boolean"),
        include_usage=bool(stream_options.get("include_usage", False)),
        tenant=tenant if tenant is not None else (header_tenant or ""),
    )


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The function a chat request forces: tool_choice {"type": "function", "function": {"name": N}} or "required"."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InvalidRequest("'tools' must be a list of {type: function, function: {name, ...}} objects", "tools")
    names = [(t.get("function") or {}).get("name") for t in tools or []]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not one of tools: {names}", "tool_choice")
        return name
    if choice == "required":
        if not names or not isinstance(names[0], str):
            raise InvalidRequest("tool_choice 'required' needs at least one named function in 'tools'", "tool_choice")
        return names[0]
    return None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_response_id(api: str) -> str:
    return ("chatcmpl-" if api == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(seq: Sequence, with_spec: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": seq.num_prompt_tokens,
        "completion_tokens": seq.num_output_tokens,
        "total_tokens": seq.num_tokens,
        "prompt_tokens_details": {"cached_tokens": seq.num_cached_tokens or 0},
    }
    if with_spec:
        out["spec_accepted_tokens"] = seq.spec_accepted_tokens
        out["spec_draft_tokens"] = seq.spec_draft_tokens
    return out


class ResponseBuilder:
    """Builds the JSON objects of one response, in OpenAI's shapes."""

    def __init__(self, api: str, model: str, tool: str | None = None) -> None:
        self.api = api
        self.model = model
        self.tool = tool if api == "chat" else None  # answer as a call to this function
        self.id = new_response_id(api)
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if api == "chat" else "text_completion"
        self._sse_head: bytes | None = None
        self._sse_tail = b""

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}

    def role_chunk(self) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
        if self.tool is not None:  # the call's head: what the arguments that follow belong to
            delta = {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_" + self.id[-24:], "type": "function",
                 "function": {"name": self.tool, "arguments": ""}}]}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _finish(self, finish_reason: str | None) -> str | None:
        return "tool_calls" if self.tool is not None and finish_reason is not None else finish_reason

    def sse_text_chunk(self, text: str) -> bytes:
        """`data: {...}` of a mid-stream text chunk, as bytes. Only the text varies within a stream, so the
        JSON around it is serialized once per request instead of once per token (the server's hot path)."""
        if self._sse_head is None:
            template = json.dumps(self.text_chunk("\x00", None), separators=(",", ":")).encode()
            self._sse_head, self._sse_tail = template.split(b'"\\u0000"')
            self._sse_head = b"data: " + self._sse_head
            self._sse_tail += b"\n\n"
        return self._sse_head + json.dumps(text).encode() + self._sse_tail

    def text_chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.api == "chat":
            if self.tool is not None:
                delta: dict[str, Any] = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
            else:
                delta = {"content": text} if text else {}
            return self._chunk([{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": self._finish(finish_reason)}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, usage_: dict[str, Any]) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage_
        return chunk

    def full_response(self, text: str, finish_reason: str | None, usage_: dict[str, Any]) -> dict[str, Any]:
        if self.api == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tool is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_" + self.id[-24:], "type": "function",
                     "function": {"name": self.tool, "arguments": text}}]}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(finish_reason)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage_}
