"""What a transport saw of one request: raw body bytes with their arrival times.

Transports only move bytes and read the clock; everything that parses (SSE,
JSON, usage) runs after the stream ended, in `harness.client.outcome`. That
keeps the per-read path down to one clock read and two list appends.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Exchange:
    """One request/response as seen on the wire. Times are absolute `perf_counter()` values."""

    sent_at: float | None = None  # just before the request bytes were handed to the socket
    connect_s: float | None = None  # time to open a new connection; None when one was reused
    status: int | None = None  # HTTP status, None when no response head arrived
    content_type: str = ""
    pieces: list[bytes] = field(default_factory=list)  # body bytes (transfer coding removed)
    times: list[float] = field(default_factory=list)  # arrival time of the read that carried each piece
    end_at: float | None = None  # body end, or when the failure was seen
    complete: bool = False  # the body ended as HTTP says it should
    error_kind: str | None = None  # transport failure: connect | reset | timeout | protocol | cancelled
    error_message: str | None = None

    def fail(self, kind: str, message: str, at: float) -> None:
        """Record the first failure only: later ones are consequences of it."""
        if self.error_kind is None:
            self.error_kind = kind
            self.error_message = message
            self.end_at = at
