"""Transports: how bytes move. `make_transport` picks one by name."""

from __future__ import annotations

from servescope.harness.client.config import ClientConfig
from servescope.harness.client.endpoint import Endpoint
from servescope.harness.client.transports.base import Transport

# "auto" -> fast: benchmarks/loadgen_capacity.py measured it well ahead of httpx
# (and aiohttp) in CPU per chunk, timing error and first-wave spread.
AUTO = "fast"


def make_transport(config: ClientConfig, endpoint: Endpoint) -> Transport:
    name = AUTO if config.transport == "auto" else config.transport
    if name == "fast":
        from servescope.harness.client.transports.fast import FastTransport

        return FastTransport(endpoint, config)
    if name == "httpx":
        from servescope.harness.client.transports.httpx_transport import HttpxTransport

        return HttpxTransport(endpoint, config)
    if name == "aiohttp":
        from servescope.harness.client.transports.aiohttp_transport import AiohttpTransport

        return AiohttpTransport(endpoint, config)
    raise ValueError(f"unknown transport {name!r}")


__all__ = ["Transport", "make_transport"]
