"""The OpenAI-compatible HTTP server (aiohttp.web): completions, chat, models, health, metrics.

aiohttp is a mature, fast asyncio server that is already a dependency. The
model loop never runs on the event loop: it runs in a thread of this process
(thread mode, `async_engine.AsyncEngine`) or in a child process (process mode,
`engine_process.ProcessEngineClient`, like vLLM's EngineCore, so the loop and
the SSE writing do not share a GIL). Handlers see only the `EngineClient`
interface, so they do not care which. A long prefill never blocks accepting
connections or streaming other requests' tokens. Handlers are cancelled when
their client disconnects (`handler_cancellation=True`), which aborts the
request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Union

from aiohttp import web

from servescope.reference_engine.batch_tokenizer import BatchTokenizer
from servescope.reference_engine.engine_client import EngineClient, EngineFailed
from servescope.reference_engine.engine_process import (
    EngineLaunch,
    EngineProcessHandle,
    ProcessEngineClient,
    start_engine_process,
)
from servescope.reference_engine.errors import InvalidRequest
from servescope.reference_engine.metrics import CONTENT_TYPE
from servescope.reference_engine.protocol import ParsedRequest, ResponseBuilder, error_body, parse_request

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", EngineClient)
SETTINGS_KEY = web.AppKey("settings", dict)
TOKENIZER_KEY = web.AppKey("tokenizer", BatchTokenizer)

# What a server can be started from: an engine built here (thread mode), a launch description or an
# already started engine process (process mode), or a ready-made client.
EngineSource = Union["LLMEngine", EngineLaunch, EngineProcessHandle, EngineClient]


def engine_client(source: EngineSource, model_name: str) -> EngineClient:
    """The front end's client for `source`. A launch is started here (blocking until the engine is built)."""
    if isinstance(source, EngineClient):
        return source
    if isinstance(source, EngineLaunch):
        source = start_engine_process(source)
    if isinstance(source, EngineProcessHandle):
        return ProcessEngineClient(source)
    from servescope.reference_engine.async_engine import AsyncEngine  # imports torch: only thread mode needs it here
    from servescope.reference_engine.metrics import EngineMetrics

    return AsyncEngine(source, EngineMetrics(model_name))


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# Routes a key guards when one is set: the API and the engine's internals. /health and /metrics stay
# open, as vLLM's do, for probes and scrapers.
_KEYED_PREFIXES = ("/v1/", "/internal/")


@web.middleware
async def _api_key_middleware(request: web.Request, handler):
    api_key = request.app[SETTINGS_KEY].get("api_key")
    if api_key and request.path.startswith(_KEYED_PREFIXES):
        sent = request.headers.get("Authorization", "").encode()
        # Constant time: how long a wrong key takes must not tell how much of it was right.
        if not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
            return _json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
    return await handler(request)


def _engine_gone(engine: EngineClient) -> web.Response:
    """503 with the reason the engine can serve nothing more (e.g. a tensor-parallel rank died); the
    server is exiting."""
    return _json_error(503, f"the engine is gone: {engine.lost_reason}", "server_error", code="engine_dead")


async def _tokenize(tokenizer: BatchTokenizer, parsed: ParsedRequest) -> list[int]:
    if parsed.messages is not None:
        return await tokenizer.encode(tokenizer.tokenizer.render_chat(parsed.messages), add_special_tokens=False)
    if isinstance(parsed.prompt, str):
        return await tokenizer.encode(parsed.prompt)
    return list(parsed.prompt or [])


async def _generate(request: web.Request, api: str) -> web.StreamResponse:
    arrival = time.perf_counter()
    engine = request.app[ENGINE_KEY]
    settings = request.app[SETTINGS_KEY]
    if not engine.alive:
        return _engine_gone(engine)
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _json_error(400, f"the request body is not valid JSON: {exc}")
    try:
        parsed = parse_request(body, api, request.headers.get("X-Tenant"))
        if parsed.model and parsed.model != settings["model_name"]:
            raise InvalidRequest(f"The model `{parsed.model}` does not exist; this server serves "
                                 f"`{settings['model_name']}` (see GET /v1/models)", "model", "model_not_found")
        prompt_ids = await _tokenize(request.app[TOKENIZER_KEY], parsed)
        engine.validate_prompt(prompt_ids, parsed.params)
    except InvalidRequest as exc:
        return _json_error(400, exc.message, param=exc.param, code=exc.code)
    max_waiting = engine.max_waiting
    if max_waiting is not None and engine.num_waiting >= max_waiting:
        return _json_error(429, f"the engine's waiting queue is full ({max_waiting} requests); retry later",
                           "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"})

    builder = ResponseBuilder(api, settings["model_name"], parsed.tool)
    outputs = engine.generate(prompt_ids, parsed.params, parsed.tenant, builder.id, arrival)
    if not parsed.stream:
        texts: list[str] = []
        last = None
        try:
            async for out in outputs:
                texts.append(out.text)
                last = out
        except EngineFailed as exc:
            if not engine.alive:
                return _engine_gone(engine)
            return _json_error(500, f"the engine failed: {exc}", "server_error")
        assert last is not None
        return web.json_response(builder.full_response("".join(texts), last.finish_reason, last.usage))

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        if api == "chat":
            await response.write(_sse(builder.role_chunk()))
        async for out in outputs:
            if out.finished:
                await response.write(_sse(builder.text_chunk(out.text, out.finish_reason)))
            elif out.text:
                await response.write(builder.sse_text_chunk(out.text))
            if out.finished and parsed.include_usage:
                await response.write(_sse(builder.usage_chunk(out.usage)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except EngineFailed as exc:
        await response.write(_sse(error_body(f"the engine failed: {exc}", "server_error")))
    except ConnectionError:
        pass  # the client left mid-stream
    finally:
        await outputs.aclose()  # not finished: aborts the request and frees its blocks
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    engine = request.app[ENGINE_KEY]
    return web.json_response({"object": "list", "data": [{
        "id": settings["model_name"], "object": "model", "created": settings["created"], "owned_by": "servescope",
        "max_model_len": engine.max_model_len}]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    if not engine.alive:
        return web.Response(status=503, text=f"the engine is gone: {engine.lost_reason}")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    try:
        body = await request.app[ENGINE_KEY].render_metrics()
    except EngineFailed as exc:
        return _json_error(503, str(exc), "server_error")
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def engine_state(request: web.Request) -> web.Response:
    """Internal: block-pool and scheduler figures, the engine's pid and mode (tests and debugging; not
    part of the OpenAI API)."""
    try:
        return web.json_response(await request.app[ENGINE_KEY].engine_state())
    except EngineFailed as exc:
        return _json_error(503, str(exc), "server_error")


def build_app(engine: EngineSource, model_name: str, api_key: str | None = None) -> web.Application:
    """The aiohttp application; the engine client starts with the app and stops with it."""
    client = engine_client(engine, model_name)
    app = web.Application(middlewares=[_api_key_middleware], client_max_size=64 << 20)
    app[ENGINE_KEY] = client
    app[TOKENIZER_KEY] = tokenizer = BatchTokenizer(client.tokenizer)
    app[SETTINGS_KEY] = {"model_name": model_name, "api_key": api_key, "created": int(time.time())}
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/internal/engine", engine_state)

    async def start_engine(app_: web.Application) -> None:
        await client.start()

    async def stop_engine(app_: web.Application) -> None:
        tokenizer.close()
        await client.stop()

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


class ServerThread:
    """The server on its own event loop in a background thread (tests, benchmarks). Stop with `stop()`.

    `engine` picks the mode: an `LLMEngine` runs in a thread of this process, an `EngineLaunch` is
    started as an engine process first (blocking until its engine is built). The engine process is
    spawned, which re-imports the calling script: a script that starts one needs the usual
    `if __name__ == "__main__":` guard.
    """

    def __init__(self, engine: EngineSource, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> None:
        self.client = engine_client(engine, model_name)
        self.app = build_app(self.client, model_name, api_key)
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            self.client.shutdown_processes()
            raise RuntimeError(f"the server thread did not start: {self._error or 'no answer within 30 s'}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # the port the OS chose for port 0

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            if self._runner is not None:  # e.g. the port was taken: stop the engine the app started
                try:
                    self._loop.run_until_complete(self._runner.cleanup())
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.exception("cleanup after a failed start")
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def serve(engine: LLMEngine | EngineProcessHandle | EngineClient, host: str, port: int, model_name: str,
          api_key: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking).

    Process mode: `engine` is an engine process that is already built and ready, so the port is bound
    only once requests can be served (a harness waiting for /health waits for the engine). The engine
    process is stopped and reaped however the server ends; if it dies on its own, the server exits too
    (status 1) rather than answering 500s that look like a live target.
    """
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # optional: the standard loop works, a bit slower
        pass
    client = engine_client(engine, model_name)
    engine_lost: list[str] = []
    if client.mode != "thread":  # engine processes (one, or a disaggregated engine's pools)
        def exit_server(reason: str) -> None:
            engine_lost.append(reason)
            os.kill(os.getpid(), signal.SIGTERM)  # run_app's handler: a graceful exit

        client.on_lost = exit_server
    else:
        # The engine thread and the event loop share the GIL: a shorter switch interval lets a ready
        # token reach its socket without waiting out the engine's Python bookkeeping (measured in
        # benchmarks/engine_cpu.py: lower HTTP overhead at batch 1).
        sys.setswitchinterval(0.0005)
    app = build_app(client, model_name, api_key)
    facts = client.facts
    print(f"servescope reference engine: serving {model_name!r} on http://{host}:{port} "
          f"({facts.device}, {facts.num_blocks} KV blocks of {facts.block_size})", flush=True)
    try:
        web.run_app(app, host=host, port=port, print=None, handler_cancellation=True, access_log=None)
    finally:
        client.shutdown_processes()  # a no-op when the app's cleanup stopped them already
    if engine_lost:
        sys.exit(f"servescope reference engine: {engine_lost[0]}")
