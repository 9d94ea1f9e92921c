"""Fixtures of the client tests: one real scripted server per module, a helper to send one request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from support.scripted_server import ScriptedServer

from servescope.harness.client import ClientConfig, StreamingClient
from servescope.rundir.schema import RequestRecord
from servescope.workloads.types import RequestSpec

TRANSPORTS = ("fast", "httpx", "aiohttp")


@pytest.fixture(scope="session")
def server():
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


def _make_spec(api: str = "completions", script: dict[str, Any] | None = None, max_tokens: int = 5, **kw: Any) -> RequestSpec:
    return RequestSpec(
        request_id="r", api=api, prompt="hello" if api == "completions" else None,
        messages=[{"role": "user", "content": "hello"}] if api == "chat" else None,
        max_tokens=max_tokens, extra_body={"script": script or {}}, **kw,
    )


def _send(base_url: str, transport: str, spec: RequestSpec, *, prewarm: int = 1,
          clock_origin: float | None = None, **cfg: Any) -> RequestRecord:
    """Send one request on a fresh client (after a prewarm) and return its record.

    clock_origin=0.0 makes the record's times absolute perf_counter() values,
    comparable with the scripted server's write log (same clock).
    """
    origin = time.perf_counter() if clock_origin is None else clock_origin

    async def go() -> RequestRecord:
        client = StreamingClient(ClientConfig(base_url, "m", origin, transport=transport, **cfg))
        try:
            if prewarm:
                await client.prewarm(prewarm)
            record = RequestRecord(spec.request_id)
            await client.execute(spec, record)
            return record
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def make_spec():
    """make_spec(api, script, max_tokens, **spec_fields) -> RequestSpec carrying the server script."""
    return _make_spec


@pytest.fixture
def send():
    """send(base_url, transport, spec, prewarm=1, **config) -> RequestRecord (one request, fresh client)."""
    return _send
