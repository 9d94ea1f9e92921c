"""How one worker's streaming client talks to its target.

One `ClientConfig` per worker process. It is validated on construction so a
bad flag fails before any load is sent, with a message that says how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

TRANSPORTS = ("auto", "fast", "httpx", "aiohttp")


def check_transport(name: str) -> str:
    """`name` if it is a known transport; otherwise a ValueError naming the choices."""
    if name not in TRANSPORTS:
        raise ValueError(f"transport {name!r} is unknown; choose one of {', '.join(TRANSPORTS)}")
    return name


@dataclass
class ClientConfig:
    """Settings of a `StreamingClient`.

    `timeout_s` is an *idle* timeout: a request fails with status `timeout` when
    no byte arrives for `timeout_s`, whether the server never answers or stalls
    mid-stream. A long generation that keeps streaming is never cut off, which
    is what a benchmark of long outputs needs.
    """

    base_url: str  # e.g. http://127.0.0.1:8000 (the client appends /v1/...)
    model: str
    clock_origin: float  # time.perf_counter() at run start; records hold perf_counter() - clock_origin
    api_key: str | None = field(default=None, repr=False)  # sent as Bearer; never logged or written
    timeout_s: float = 60.0
    stream: bool = True  # False: one JSON answer, E2E only
    pool_size: int = 64  # keep-alive connections kept idle (sized to the concurrency)
    force_output_length: bool = False  # send spec.min_tokens / ignore_eos
    transport: str = "auto"  # "auto" | "fast" | "httpx" | "aiohttp"
    count_tokens: Callable[[str], int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url {self.base_url!r} is not an http(s) URL; "
                "give the server's base URL, e.g. http://127.0.0.1:8000"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"base_url {self.base_url!r} must not carry a query or fragment")
        if not self.model:
            raise ValueError("model is empty; pass the served model name (see GET /v1/models)")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 (size it to the concurrency), got {self.pool_size}")
        check_transport(self.transport)
        if self.api_key is not None and any(c in self.api_key for c in "\r\n"):
            raise ValueError("api_key contains a line break; check the environment variable it came from")
