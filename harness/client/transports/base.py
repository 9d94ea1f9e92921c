"""The transport abstraction: move one request's bytes and timestamp the answer.

A transport never parses SSE or JSON and never raises for a failed request: it
fills an `Exchange` (status, raw body pieces with arrival times, or a failure
kind). The only exception it lets out is `asyncio.CancelledError`, after
marking the exchange cancelled and dropping the connection it was using.
"""

from __future__ import annotations

import abc

from servescope.harness.client.config import ClientConfig
from servescope.harness.client.endpoint import Endpoint
from servescope.harness.client.exchange import Exchange

USER_AGENT = "servescope/0.1"


class Transport(abc.ABC):
    name = ""  # as --transport spells it

    def __init__(self, endpoint: Endpoint, config: ClientConfig) -> None:
        self.endpoint = endpoint
        self.config = config

    def common_headers(self) -> dict[str, str]:
        # identity: the raw body bytes are the SSE bytes, with no decompression on the read path.
        headers = {"User-Agent": USER_AGENT, "Accept": "text/event-stream, application/json",
                   "Accept-Encoding": "identity"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    @abc.abstractmethod
    async def prewarm(self, n: int) -> int:
        """Open `n` keep-alive connections concurrently with a cheap GET; return how many are idle now."""

    @abc.abstractmethod
    async def exchange(self, path: str, body: bytes, ex: Exchange) -> None:
        """POST `body` (JSON) to `path` and fill `ex`; never raises except CancelledError."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection."""
