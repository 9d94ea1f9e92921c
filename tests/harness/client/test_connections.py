"""Pre-warm, connection reuse, the first wave and the API key, checked from the server side."""

from __future__ import annotations

import asyncio
import time

from support.scripted_server import ScriptedServer

from servescope.harness.client import ClientConfig, StreamingClient
from servescope.rundir.schema import RequestRecord


def test_prewarm_opens_n_connections_and_requests_reuse_them(server, transport, make_spec) -> None:
    async def go() -> list[RequestRecord]:
        client = StreamingClient(ClientConfig(server.base_url, "m", time.perf_counter(), transport=transport))
        server.reset()
        await client.prewarm(16)
        stats = server.stats()
        # At least 16 (httpx may keep its /health probe's connection as a 17th).
        assert stats["connections_open"] >= 16 and stats["requests"] == 0, stats
        opened = stats["connections_opened"]
        records = [RequestRecord(f"r{i}") for i in range(16)]
        spec = make_spec("completions", {"tokens": 3, "first_token_delay_s": 0.02})
        await asyncio.gather(*(client.execute(spec, r) for r in records))
        assert server.stats()["connections_opened"] == opened  # no new connection for the first wave
        await client.aclose()
        return records

    records = asyncio.run(go())
    assert all(r.status == "ok" and r.connect_s is None for r in records)
    spread = max(r.sent_at for r in records) - min(r.sent_at for r in records)
    assert spread < 0.05, f"first wave went out over {spread * 1e3:.1f} ms"


def test_a_new_connection_records_connect_time(server, transport, send, make_spec) -> None:
    rec = send(server.base_url, transport, make_spec(), prewarm=0)
    assert rec.status == "ok", rec.error_message
    assert rec.connect_s is not None and 0 < rec.connect_s < 0.5
    assert rec.ttft_s is not None and rec.ttft_s >= 0


def test_prewarm_counts_any_http_answer_when_health_is_missing(transport) -> None:
    with ScriptedServer(health=False) as srv:
        async def go() -> int:
            client = StreamingClient(ClientConfig(srv.base_url, "m", time.perf_counter(), transport=transport))
            try:
                return await client.prewarm(3)
            finally:
                await client.aclose()

        assert asyncio.run(go()) >= 3
        assert srv.stats()["requests"] == 0  # never a generation request


def test_api_key_is_sent_as_bearer(server, transport, send, make_spec) -> None:
    rec = send(server.base_url, transport, make_spec(), api_key="sk-test-42")
    assert rec.status == "ok"
    assert server.stats()["last_headers"]["authorization"] == "Bearer sk-test-42"
