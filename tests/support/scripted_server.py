"""A real, scriptable OpenAI-compatible SSE server for tests and benchmarks.

It runs in its own process (so its timing never shares a GIL with the client
under test), listens on 127.0.0.1 on a free port, and logs the real time
(`time.perf_counter()`, the same CLOCK_MONOTONIC clock as the client) just after
it wrote each content chunk, keyed by the response `id`: a client's timing
error is its timestamp minus that write time.

    from support.scripted_server import ScriptedServer
    with ScriptedServer() as srv:
        srv.base_url                    # http://127.0.0.1:PORT
        ... send requests to srv.base_url + "/v1/completions" ...
        srv.write_log("cmpl-7")         # [t_chunk0, t_chunk1, ...]
        srv.receive_log()               # {"cmpl-7": t_request_received, ...}
        srv.stats()                     # {"connections_opened", "connections_open", "requests", "gets"}
        srv.reset()                     # clear stats and logs

Each generation request is scripted by a JSON object under the body key
`script` (with the harness: `RequestSpec.extra_body={"script": {...}}`).
Every key is optional:

    tokens               int    tokens to generate (default: the body's max_tokens)
    tokens_per_chunk     int    tokens carried by each content chunk (default 1)
    chunk_sizes          list[int]  tokens of each content chunk, in order (overrides
                         tokens_per_chunk; the rest, if any, one per chunk)
    first_token_delay_s  float  delay from the request to the first content chunk (default 0)
    itl_s                float | list[float]  delay between content chunks (default 0)
    role_chunk           bool   chat: open with a role-only chunk (default true for chat)
    role_chunk_content   bool   the role-only chunk carries `"content": ""` (default true;
                         false: `{"role": "assistant"}` alone, as transformers serve sends it)
    usage                "finish" | "separate" | "none"   where usage goes
                         (default: "separate" if stream_options.include_usage else "none")
    cached_tokens, spec_accepted_tokens, spec_draft_tokens   int  extra usage fields
    kv_transfer_s        float  the disaggregated engine's usage extension
    eos                  bool   end on a stop token as vLLM does: finish_reason "stop", and usage
                         counts one token more than the text carried (default false)
    done                 bool   end with `data: [DONE]` (default true)
    framing              "chunked" | "length" | "eof"  HTTP body framing (default chunked)
    crlf                 bool   CRLF line endings (default false)
    comments             bool   add `: keep-alive` comments and `event:` lines (default false)
    split_events         bool   write every event in two halves, 1 ms apart (default false)
    coalesce             bool   write all events in one write (default false)
    id                   str    response id (default cmpl-N)
    fault                str    one of
        http_error    answer fault_status (default 500) with an OpenAI error body carrying fault_message
        reset         abort the connection (RST) after fault_after content chunks
        malformed_json / malformed_sse   send a broken event after fault_after chunks
        stream_error  send `data: {"error": {...}}` after fault_after chunks
        hang          never answer;  stall: stop after fault_after chunks, keep the connection open
        close         close the connection without answering
        non_sse       answer a streaming request with a plain JSON body
    fault_status int, fault_message str, fault_after int (default 1)
    text                 str    stream this text, one word per content chunk (overrides tokens)
    tool_call            bool   chat with `tools` in the body: answer with streamed tool calls
                         (default true): the first fragment carries id and name, the arguments
                         follow in several fragments, finish_reason "tool_calls"
    tool_calls           int    how many tool calls (default 1), to the body's tools in turn
    tool_arguments       dict   the arguments written (default {"query": <last user text, 40 chars>, "n": i})

GET /health (404 when started with health=False), /v1/models and /metrics
answer as a real server would; GET /_stats, GET /_log?id=ID (all ids without
it), GET /_received (when each request's last byte arrived, by response id), GET /_bodies?id=ID (the request body that got that response id; all
without it, the last 10,000) and POST /_reset are the test-side controls.

Server-wide options (ScriptedServer keywords) emulate servers that differ from
vLLM in ways a request script cannot express:

    models_status    int        GET /v1/models answers this status with an error body (e.g. 500)
    metrics          bool       False: no /metrics (404)
    reject_fields    list[str]  generation requests naming any of these body fields get a 422
                                "Unexpected fields in the request" (a strict pydantic server)
    default_script   dict       script keys applied under every request's own script
    slots            int        serve at most this many generation requests at once; the rest wait
                                in arrival order (a server that saturates: its queue grows when
                                requests arrive faster than it finishes them), and /metrics reports
                                vllm:num_requests_running / vllm:num_requests_waiting of them

`ScriptedServer.transformers_like()` combines them the way `transformers serve`
behaves (usage on the finish chunk, a bare role-only chunk, no `[DONE]`,
several tokens per chunk, /v1/models 500, no /metrics, 422 for min_tokens/ignore_eos).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


# ============================================================================ server side
class _State:
    def __init__(self, health: bool, options: dict[str, Any] | None = None) -> None:
        self.health = health
        options = options or {}
        self.models_status = int(options.get("models_status", 200))
        self.metrics = bool(options.get("metrics", True))
        self.reject_fields = tuple(options.get("reject_fields", ()))
        self.default_script = dict(options.get("default_script", {}))
        self.slots = asyncio.Semaphore(int(options["slots"])) if options.get("slots") else None
        self.running = 0
        self.waiting = 0
        self.next_id = 0
        self.log: dict[str, list[float]] = {}
        self.received: dict[str, float] = {}  # response id -> when its request's last byte was read
        self.bodies: dict[str, Any] = {}  # response id -> request body (bounded: the last MAX_BODIES)
        self.last_headers: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self.connections_opened = 0
        self.requests = 0
        self.rejected = 0
        self.last_body_keys: list[str] = []
        self.gets = 0
        self.log.clear()
        self.received.clear()
        self.bodies.clear()

    def stats(self, open_now: int) -> dict[str, Any]:
        return {"connections_opened": self.connections_opened, "connections_open": open_now,
                "requests": self.requests, "gets": self.gets, "last_headers": self.last_headers,
                "rejected": self.rejected, "last_body_keys": self.last_body_keys}


class _Conn(asyncio.Protocol):
    open_count = 0

    def __init__(self, state: _State) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counted = False  # set by the first request that is not a /_ control request

    def count(self) -> None:
        if not self.counted:
            self.counted = True
            self.state.connections_opened += 1
            _Conn.open_count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            _Conn.open_count -= 1
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""
        self.body: list[bytes] = []
        self.headers: dict[str, str] = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.received_at = time.perf_counter()  # the request is complete: its receive time
        method = self.parser.get_method().decode()
        self.task = asyncio.get_running_loop().create_task(
            _handle(self, method, self.url.decode(), self.headers, b"".join(self.body)))

    # --- writing -------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.write(head + body)

    def abort_with_rst(self) -> None:
        sock = self.transport.get_extra_info("socket")  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()  # type: ignore[union-attr]


async def _handle(conn: _Conn, method: str, url: str, headers: dict[str, str], body: bytes) -> None:
    state = conn.state
    parts = urlsplit(url)
    path = parts.path
    if not path.startswith("/_"):
        conn.count()
    if method == "GET":
        state.gets += 1
        if path == "/health":
            if state.health:
                conn.respond(200, b"ok", "text/plain")
            else:
                conn.respond(404, b'{"error": {"message": "not found"}}')
        elif path == "/v1/models":
            if state.models_status != 200:
                conn.respond(state.models_status, json.dumps(
                    {"error": {"message": "scripted /v1/models failure", "code": state.models_status}}).encode())
            else:
                conn.respond(200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode())
        elif path == "/metrics" and state.metrics:
            conn.respond(200, _metrics(state).encode(), "text/plain; version=0.0.4")
        elif path == "/_stats":
            conn.respond(200, json.dumps(state.stats(_Conn.open_count)).encode())
        elif path == "/_log":
            rid = parse_qs(parts.query).get("id", [None])[0]
            payload = state.log.get(rid, []) if rid else state.log
            conn.respond(200, json.dumps(payload).encode())
        elif path == "/_received":
            conn.respond(200, json.dumps(state.received).encode())
        elif path == "/_bodies":
            rid = parse_qs(parts.query).get("id", [None])[0]
            conn.respond(200, json.dumps(state.bodies.get(rid) if rid else state.bodies).encode())
        else:
            conn.respond(404, b'{"error": {"message": "no such path"}}')
        return
    if method == "POST" and path == "/_reset":
        state.reset()
        conn.respond(200, b"{}")
        return
    if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
        conn.respond(404, b'{"error": {"message": "no such path"}}')
        return
    state.requests += 1
    state.last_headers = headers
    try:
        req = json.loads(body)
    except ValueError:
        conn.respond(400, b'{"error": {"message": "body is not JSON", "code": 400}}')
        return
    state.last_body_keys = sorted(req) if isinstance(req, dict) else []
    unexpected = sorted(f for f in state.reject_fields if f in req)
    if unexpected:  # FastAPI/pydantic's answer to extra fields (transformers serve does this)
        state.rejected += 1
        conn.respond(422, json.dumps({"detail": f"Unexpected fields in the request: {set(unexpected)}"}).encode())
        return
    if state.slots is None:
        await _generate(conn, req, chat=path.endswith("/chat/completions"))
        return
    state.waiting += 1
    try:
        await state.slots.acquire()  # a client that gives up while waiting leaves the queue here
    finally:
        state.waiting -= 1
    state.running += 1
    try:
        await _generate(conn, req, chat=path.endswith("/chat/completions"))
    finally:
        state.running -= 1
        state.slots.release()


def _metrics(state: _State) -> str:
    running = _Conn.open_count if state.slots is None else state.running
    queue = "" if state.slots is None else ("# TYPE vllm:num_requests_waiting gauge\n"
                                            f'vllm:num_requests_waiting{{model_name="scripted"}} {state.waiting}\n')
    return ("# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="scripted"}} {running}\n' + queue +
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="scripted"}} {state.requests}\n')


class _Stream:
    """Writes SSE events with the script's framing and line endings, logging content-chunk write times."""

    def __init__(self, conn: _Conn, script: dict[str, Any], rid: str) -> None:
        self.conn = conn
        self.framing = script.get("framing", "chunked")
        self.crlf = bool(script.get("crlf"))
        self.comments = bool(script.get("comments"))
        self.split = bool(script.get("split_events"))
        self.log = conn.state.log.setdefault(rid, [])

    def encode(self, data: bytes | None, raw: bytes | None = None) -> bytes:
        if raw is not None:
            event = raw
        else:
            event = (b"event: completion\n" if self.comments else b"") + b"data: " + data + b"\n\n"  # type: ignore[operator]
            if self.comments:
                event = b": keep-alive\n\n" + event
        return event.replace(b"\n", b"\r\n") if self.crlf else event

    def frame(self, payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload) if self.framing == "chunked" else payload

    def head(self, content_length: int | None = None) -> None:
        lines = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache"]
        if self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif self.framing == "length":
            lines.append(f"Content-Length: {content_length}")
        else:
            lines.append("Connection: close")
        self.conn.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, event: bytes, content: bool) -> None:
        if self.split and len(event) > 2:
            half = len(event) // 2
            self.conn.write(self.frame(event[:half]))
            await asyncio.sleep(0.001)
            event = event[half:]
        self.conn.write(self.frame(event))
        if content:
            self.log.append(time.perf_counter())

    def end(self) -> None:
        if self.framing == "chunked":
            self.conn.write(b"0\r\n\r\n")
        elif self.framing == "eof":
            self.conn.transport.close()  # type: ignore[union-attr]


def _chunk_sizes(tokens: int, per_chunk: int, explicit: list[int] | None) -> list[int]:
    """Tokens of each content chunk: `explicit` first (capped at `tokens`), then `per_chunk` at a time."""
    sizes: list[int] = []
    remaining = tokens
    for k in explicit or []:
        if remaining <= 0:
            break
        k = min(max(1, int(k)), remaining)
        sizes.append(k)
        remaining -= k
    step = 1 if explicit else per_chunk
    while remaining > 0:
        k = min(step, remaining)
        sizes.append(k)
        remaining -= k
    return sizes


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    await asyncio.sleep(delay if delay > 0 else 0)


async def _generate(conn: _Conn, req: dict[str, Any], chat: bool) -> None:
    state = conn.state
    script: dict[str, Any] = {**state.default_script, **(req.get("script") or {})}
    state.next_id += 1
    rid = str(script.get("id") or f"{'chatcmpl' if chat else 'cmpl'}-{state.next_id}")
    fault = script.get("fault")
    t0 = time.perf_counter()
    state.received[rid] = conn.received_at
    state.bodies[rid] = req
    if len(state.bodies) > MAX_BODIES:
        del state.bodies[next(iter(state.bodies))]
    if fault == "close":
        conn.transport.close()  # type: ignore[union-attr]
        return
    if fault == "hang":
        await asyncio.Event().wait()  # until the client gives up (connection_lost cancels us)
    if fault == "http_error":
        status = int(script.get("fault_status", 500))
        message = script.get("fault_message", "scripted failure")
        conn.respond(status, json.dumps({"error": {"message": message, "type": "ScriptedError", "code": status}}).encode())
        return

    words = [" " + w for w in str(script["text"]).split()] if "text" in script else None
    tokens = len(words) if words is not None else int(script.get("tokens", req.get("max_tokens", 16)))
    per_chunk = max(1, int(script.get("tokens_per_chunk", 1)))
    itl = script.get("itl_s", 0.0)
    first_delay = float(script.get("first_token_delay_s", 0.0))
    sizes = _chunk_sizes(tokens, per_chunk, script.get("chunk_sizes"))
    n_chunks = len(sizes)
    gaps = itl if isinstance(itl, list) else [float(itl)] * max(0, n_chunks - 1)
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    usage_mode = script.get("usage", "separate" if include_usage else "none")
    finish_reason = "stop" if script.get("eos") else "length"
    generated = tokens + 1 if script.get("eos") else tokens  # the stop token has no text
    usage = {"prompt_tokens": 7, "completion_tokens": generated, "total_tokens": 7 + generated}
    if "cached_tokens" in script:
        usage["prompt_tokens_details"] = {"cached_tokens": script["cached_tokens"]}
    for key in ("spec_accepted_tokens", "spec_draft_tokens", "kv_transfer_s"):
        if key in script:
            usage[key] = script[key]
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": req.get("model", "scripted")}

    if not req.get("stream"):
        await _sleep_until(t0 + first_delay + sum(gaps))
        text = "".join(words) if words is not None else " tok" * tokens
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat
                  else {"index": 0, "text": text, "finish_reason": "length"})
        conn.respond(200, json.dumps({**base, "choices": [choice], "usage": usage}).encode())
        return
    if fault == "non_sse":
        conn.respond(200, json.dumps({**base, "choices": [{"index": 0, "text": "x"}]}).encode())
        return

    def chunk(text: str | None, finish: str | None = None, role: bool = False, with_usage: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = ({"role": "assistant", "content": ""} if role_content else {"role": "assistant"}) \
                if role else {"content": text} if text else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = {**base, "choices": [choice]}
        if with_usage:
            obj["usage"] = usage
        return json.dumps(obj, separators=(",", ":")).encode()

    role_content = bool(script.get("role_chunk_content", True))
    stream = _Stream(conn, script, rid)
    # Content events are encoded up front so that "length" framing knows its size.
    events: list[tuple[bytes, bool]] = []
    if chat and script.get("role_chunk", True):
        events.append((stream.encode(chunk(None, role=True)), False))
    calls = _tool_calls(req, script) if chat else []
    if calls:
        finish_reason = "tool_calls"
        fragments = [fragment for i, call in enumerate(calls) for fragment in _tool_fragments(i, call)]
        sizes = [1] * len(fragments)
        n_chunks = len(sizes)
        gaps = itl if isinstance(itl, list) else [float(itl)] * max(0, n_chunks - 1)
        for i, fragment in enumerate(fragments):
            last = i == n_chunks - 1
            delta = {"index": 0, "delta": {"tool_calls": [fragment]},
                     "finish_reason": finish_reason if last and usage_mode != "finish" else None}
            events.append((stream.encode(json.dumps({**base, "choices": [delta]}, separators=(",", ":")).encode()), True))
    text_at = 0
    for i, k in enumerate(sizes if not calls else []):
        last = i == n_chunks - 1
        if words is not None:
            piece, text_at = "".join(words[text_at:text_at + k]), text_at + k
        else:
            piece = " tok" * k
        events.append((stream.encode(chunk(piece, finish_reason if last and usage_mode != "finish" else None)), True))
    if usage_mode == "finish":
        events.append((stream.encode(chunk(None, finish_reason, with_usage=True)), False))
    elif usage_mode == "separate":
        events.append((stream.encode(json.dumps({**base, "choices": [], "usage": usage}).encode()), False))
    if script.get("done", True):
        events.append((stream.encode(b"[DONE]"), False))

    fault_after = int(script.get("fault_after", 1))
    stream.head(sum(len(e) for e, _ in events) if stream.framing == "length" else None)
    if script.get("coalesce") and fault is None:
        await _sleep_until(t0 + first_delay)
        conn.write(stream.frame(b"".join(e for e, _ in events)))
        stream.log.extend([time.perf_counter()] * sum(1 for _, c in events if c))
        stream.end()
        return
    due = t0 + first_delay
    sent_content = 0
    for event, content in events:
        if fault is not None and sent_content == fault_after:
            await _fault(conn, stream, fault, script)
            return
        if content:
            if sent_content:
                due += gaps[min(sent_content - 1, len(gaps) - 1)] if gaps else 0.0
            await _sleep_until(due)
            sent_content += 1
        await stream.send(event, content)
    if fault is not None:  # fault_after beyond the last chunk: fault at the end
        await _fault(conn, stream, fault, script)
        return
    stream.end()


MAX_BODIES = 10_000


def _tool_calls(req: dict[str, Any], script: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool calls to stream for a request with `tools` (none when the script says tool_call: false)."""
    tools = req.get("tools") or []
    if not tools or script.get("tool_call", True) is False:
        return []
    last_user = next((m.get("content") or "" for m in reversed(req.get("messages") or []) if m.get("role") == "user"), "")
    calls = []
    for i in range(int(script.get("tool_calls", 1))):
        function = (tools[i % len(tools)].get("function") or {})
        arguments = script.get("tool_arguments") or {"query": str(last_user)[:40], "n": i}
        calls.append({"id": f"call_{i}_{len(last_user)}", "name": function.get("name", "tool"),
                      "arguments": json.dumps(arguments)})
    return calls


def _tool_fragments(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """A call as a stream sends it: id and name first, then the arguments in three pieces."""
    args = call["arguments"]
    cut = [0, len(args) // 3, 2 * len(args) // 3, len(args)]
    first = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}}
    return [first] + [{"index": index, "function": {"arguments": args[a:b]}} for a, b in zip(cut, cut[1:]) if b > a]


async def _fault(conn: _Conn, stream: _Stream, fault: str, script: dict[str, Any]) -> None:
    message = script.get("fault_message", "scripted failure")
    if fault == "reset":
        conn.abort_with_rst()
    elif fault == "malformed_json":
        await stream.send(stream.encode(b'{"id": "broken", "choices": [{"text": '), False)
        stream.end()
    elif fault == "malformed_sse":
        await stream.send(stream.encode(None, raw=b"this is not an event stream\n\n"), False)
        stream.end()
    elif fault == "stream_error":
        err = {"error": {"message": message, "type": "ScriptedError", "code": int(script.get("fault_status", 500))}}
        await stream.send(stream.encode(json.dumps(err).encode()), False)
        stream.end()
    elif fault == "stall":
        await asyncio.Event().wait()
    else:
        raise ValueError(f"unknown fault {fault!r}")


async def _serve(port: int, health: bool, options: dict[str, Any] | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = _State(health, options)
    server = await loop.create_server(lambda: _Conn(state), "127.0.0.1", port, backlog=4096)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible SSE server (tests and benchmarks).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-health", action="store_true", help="answer GET /health with 404")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--options", default="{}", help="server-wide options as JSON (see the module doc)")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(_serve(args.port, not args.no_health, json.loads(args.options)))


# ============================================================================ test side
class ScriptedServer:
    """Starts the server in a subprocess on a free 127.0.0.1 port; use as a context manager."""

    def __init__(self, *, health: bool = True, uvloop: bool = True, models_status: int = 200, metrics: bool = True,
                 reject_fields: tuple[str, ...] | list[str] = (), default_script: dict[str, Any] | None = None,
                 slots: int | None = None) -> None:
        self.health = health
        self.uvloop = uvloop
        self.options = {"models_status": models_status, "metrics": metrics, "reject_fields": list(reject_fields),
                        "default_script": dict(default_script or {}), "slots": slots}
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("ScriptedServer is not started; use it as `with ScriptedServer() as srv:`")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ScriptedServer":
        cmd = [sys.executable, os.path.abspath(__file__), "--port", "0"]
        if not self.health:
            cmd.append("--no-health")
        if not self.uvloop:
            cmd.append("--no-uvloop")
        cmd += ["--options", json.dumps(self.options)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()  # type: ignore[union-attr]  # "" if it died
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"scripted server did not start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    @classmethod
    def transformers_like(cls, tokens_per_chunk: int = 3, **script: Any) -> "ScriptedServer":
        """A server that behaves as `transformers serve` does (see the module doc); `script` adds default keys."""
        default = {"usage": "finish", "done": False, "role_chunk_content": False, "tokens_per_chunk": tokens_per_chunk,
                   **script}
        return cls(models_status=500, metrics=False, reject_fields=("min_tokens", "ignore_eos"), default_script=default)

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _get(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(self.base_url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def bodies(self, response_id: str | None = None) -> Any:
        return self._get(f"/_bodies?id={response_id}" if response_id else "/_bodies")

    def write_log(self, response_id: str | None = None) -> Any:
        """Write times of the content chunks of one response (or {id: times} for all)."""
        return self._get(f"/_log?id={response_id}" if response_id else "/_log")

    def receive_log(self) -> dict[str, float]:
        """{response id: when the server had read the whole request} (perf_counter, like the write log)."""
        return self._get("/_received")

    def stats(self) -> dict[str, Any]:
        return self._get("/_stats")

    def reset(self) -> None:
        self._get("/_reset", method="POST")


if __name__ == "__main__":
    main()
