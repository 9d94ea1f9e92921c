"""The OpenAI-compatible HTTP server (aiohttp.web): completions, chat, models, health, metrics.

aiohttp is a mature, fast asyncio server that is already a dependency; the
model loop runs in its own thread (`AsyncEngine`), so a long prefill never
blocks accepting connections or streaming other requests' tokens. Handlers
are cancelled when their client disconnects (`handler_cancellation=True`),
which aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any

from aiohttp import web

from reference_engine.async_engine import AsyncEngine, EngineFailed
from reference_engine.engine import LLMEngine
from reference_engine.errors import InvalidRequest
from reference_engine.metrics import CONTENT_TYPE, EngineMetrics
from reference_engine.protocol import ParsedRequest, ResponseBuilder, error_body, parse_request, usage

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", AsyncEngine)
METRICS_KEY = web.AppKey("metrics", EngineMetrics)
SETTINGS_KEY = web.AppKey("settings", dict)


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@web.middleware
async def _api_key_middleware(request: web.Request, handler):
    api_key = request.app[SETTINGS_KEY].get("api_key")
    if api_key and request.path.startswith("/v1/"):
        if request.headers.get("Authorization", "") != f"Bearer {api_key}":
            return _json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
    return await handler(request)


def _tokenize(engine: LLMEngine, parsed: ParsedRequest) -> list[int]:
    if parsed.messages is not None:
        return engine.tokenizer.apply_chat_template(parsed.messages)
    if isinstance(parsed.prompt, str):
        return engine.tokenizer.encode(parsed.prompt)
    return list(parsed.prompt or [])


async def _generate(request: web.Request, api: str) -> web.StreamResponse:
    arrival = time.perf_counter()
    async_engine = request.app[ENGINE_KEY]
    settings = request.app[SETTINGS_KEY]
    engine = async_engine.engine
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _json_error(400, f"the request body is not valid JSON: {exc}")
    try:
        parsed = parse_request(body, api, request.headers.get("X-Tenant"))
        if parsed.model and parsed.model != settings["model_name"]:
            raise InvalidRequest(f"The model `{parsed.model}` does not exist; this server serves "
                                 f"`{settings['model_name']}` (see GET /v1/models)", "model", "model_not_found")
        prompt_ids = _tokenize(engine, parsed)
        engine.validate_prompt(prompt_ids, parsed.params)
    except InvalidRequest as exc:
        return _json_error(400, exc.message, param=exc.param, code=exc.code)
    max_waiting = engine.config.max_waiting
    if max_waiting is not None and async_engine.num_waiting >= max_waiting:
        return _json_error(429, f"the engine's waiting queue is full ({max_waiting} requests); retry later",
                           "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"})

    builder = ResponseBuilder(api, settings["model_name"])
    outputs = async_engine.generate(prompt_ids, parsed.params, parsed.tenant, builder.id, arrival)
    with_spec = engine.config.spec is not None
    if not parsed.stream:
        texts: list[str] = []
        last = None
        try:
            async for out in outputs:
                texts.append(out.text)
                last = out
        except EngineFailed as exc:
            return _json_error(500, f"the engine failed: {exc}", "server_error")
        assert last is not None
        return web.json_response(builder.full_response("".join(texts), last.finish_reason, usage(last.seq, with_spec)))

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
                await response.write(_sse(builder.usage_chunk(usage(out.seq, with_spec))))
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
    engine = request.app[ENGINE_KEY].engine
    return web.json_response({"object": "list", "data": [{
        "id": settings["model_name"], "object": "model", "created": settings["created"], "owned_by": "servescope",
        "max_model_len": engine.max_model_len}]})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def engine_state(request: web.Request) -> web.Response:
    """Internal: block-pool and scheduler figures (tests and debugging; not part of the OpenAI API)."""
    engine = request.app[ENGINE_KEY].engine
    bm, sched = engine.block_manager, engine.scheduler
    return web.json_response({
        "num_blocks": bm.num_blocks, "free_blocks": bm.num_free_blocks, "kv_usage": bm.usage,
        "running": len(sched.running), "waiting": len(sched.waiting), "preemptions": sched.num_preemptions,
        "steps": engine.num_steps, "device": str(engine.device), "ops": type(engine.ops).__name__,
        "busy_s": engine.busy_s, "scheduled_seqs_total": engine.scheduled_seqs_total,
        "graph_steps": engine.runner.num_graph_steps, "eager_steps": engine.runner.num_eager_steps,
        "async_scheduling": engine.async_scheduling,
        "generation_tokens_total": engine.generation_tokens_total,
    })


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None) -> web.Application:
    """The aiohttp application; the engine thread starts with the app and stops with it."""
    metrics_ = EngineMetrics(model_name)
    engine.observer = metrics_
    async_engine = AsyncEngine(engine, on_idle=metrics_.refresh_idle)
    app = web.Application(middlewares=[_api_key_middleware], client_max_size=64 << 20)
    app[ENGINE_KEY] = async_engine
    app[METRICS_KEY] = metrics_
    app[SETTINGS_KEY] = {"model_name": model_name, "api_key": api_key, "created": int(time.time())}
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/internal/engine", engine_state)

    async def start_engine(app_: web.Application) -> None:
        async_engine.start(asyncio.get_running_loop())
        metrics_.refresh_idle(engine)

    async def stop_engine(app_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, async_engine.stop)

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


class ServerThread:
    """The server on its own event loop in a background thread (tests, benchmarks). Stop with `stop()`."""

    def __init__(self, engine: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> None:
        self.app = build_app(engine, model_name, api_key)
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server thread did not start within 30 s")

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

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def serve(engine: LLMEngine, host: str, port: int, model_name: str, api_key: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # optional: the standard loop works, a bit slower
        pass
    # The engine thread and the event loop share the GIL: a shorter switch interval lets a ready
    # token reach its socket without waiting out the engine's Python bookkeeping (measured in
    # benchmarks/engine_cpu.py: lower HTTP overhead at batch 1).
    sys.setswitchinterval(0.0005)
    app = build_app(engine, model_name, api_key)
    print(f"servescope reference engine: serving {model_name!r} on http://{host}:{port} "
          f"({engine.device}, {engine.num_blocks} KV blocks of {engine.config.block_size})", flush=True)
    web.run_app(app, host=host, port=port, print=None, handler_cancellation=True, access_log=None)
