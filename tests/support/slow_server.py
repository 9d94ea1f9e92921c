"""A small real OpenAI-compatible SSE server with a fixed latency, for the `servescope run` tests.

Every completion waits `--first-token-delay` seconds, then streams `max_tokens`
one-token chunks `--itl` seconds apart (capped by `--max-chunks`). It counts
requests in flight and records each request's arrival time (perf_counter: the
same CLOCK_MONOTONIC as the harness) so tests can check what the load
generator really did. GET /_stats returns those figures.

    python tests/support/slow_server.py --port 0 --first-token-delay 1.0
    -> prints "LISTENING <port>" once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from aiohttp import web


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.arrivals: list[float] = []
        self.gets = 0


def make_app(first_token_delay: float, itl: float, max_chunks: int, metrics: bool) -> web.Application:
    stats = Stats()

    async def completions(request: web.Request) -> web.StreamResponse:
        stats.arrivals.append(time.perf_counter())
        stats.requests += 1
        rid = f"cmpl-{stats.requests}"
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            body = await request.json()
            chat = request.path.endswith("/chat/completions")
            n = max(1, min(int(body.get("max_tokens") or 1), max_chunks))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(first_token_delay)
            for i in range(n):
                if i:
                    await asyncio.sleep(itl)
                choice = {"index": 0, "delta": {"content": " tok"}} if chat else {"index": 0, "text": " tok"}
                choice["finish_reason"] = "length" if i == n - 1 else None
                await response.write(f"data: {json.dumps({'id': rid, 'choices': [choice]})}\n\n".encode())
            usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
            await response.write(f"data: {json.dumps({'id': rid, 'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            stats.in_flight -= 1

    async def health(request: web.Request) -> web.Response:
        stats.gets += 1
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        stats.gets += 1
        return web.json_response({"object": "list", "data": [{"id": "slow-model", "object": "model"}]})

    async def metrics_page(request: web.Request) -> web.Response:
        text = ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="slow-model"}} {stats.in_flight}\n'
                "# TYPE vllm:e2e_request_latency_seconds histogram\n"
                'vllm:e2e_request_latency_seconds_bucket{le="1.0"} 1\n'
                'vllm:e2e_request_latency_seconds_bucket{le="+Inf"} 2\n'
                "vllm:e2e_request_latency_seconds_sum 3.0\n"
                "vllm:e2e_request_latency_seconds_count 2\n")
        return web.Response(text=text, content_type="text/plain")

    async def stats_page(request: web.Request) -> web.Response:
        return web.json_response({"in_flight": stats.in_flight, "max_in_flight": stats.max_in_flight,
                                  "requests": stats.requests, "arrivals": stats.arrivals, "gets": stats.gets})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_stats", stats_page)
    if metrics:
        app.router.add_get("/metrics", metrics_page)
    return app


async def _serve(port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=2048)
    await site.start()
    print(f"LISTENING {site._server.sockets[0].getsockname()[1]}", flush=True)  # noqa: SLF001 - port 0 -> real port
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--itl", type=float, default=0.0)
    parser.add_argument("--max-chunks", type=int, default=4)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args()
    app = make_app(args.first_token_delay, args.itl, args.max_chunks, not args.no_metrics)
    try:
        asyncio.run(_serve(args.port, app))
    except KeyboardInterrupt:
        pass


class SlowServer:
    """Runs this server in a subprocess on a free port (context manager)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "SlowServer":
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", "0", *self.args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING"):
            self.__exit__()
            raise RuntimeError(f"slow server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.base_url}/_stats", timeout=5) as response:
            return json.loads(response.read())


if __name__ == "__main__":
    main()
