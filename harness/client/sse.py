"""Server-sent events: split body bytes into events and read their `data` fields.

Hand-written instead of a library (httpx-sse, sseclient) for speed and because
the events must keep the arrival time of the read that completed them; this is
the whole of the SSE grammar a completion stream uses (WHATWG HTML, "Parsing an
event stream"): lines end in CRLF, LF or CR; a blank line ends an event;
`:` starts a comment; `data` lines join with LF; other fields are ignored.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

KNOWN_FIELDS = frozenset((b"data", b"event", b"id", b"retry"))


@dataclass(slots=True)
class SSEEvents:
    times: list[float]  # when the read that completed each event arrived
    data: list[bytes]  # each event's data (the `data:` lines joined by LF)
    malformed: bytes | None = None  # the first block that is not SSE at all


def _normalize(buf: bytes) -> bytes:
    return buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in buf else buf


def split_events(pieces: list[bytes], times: list[float]) -> SSEEvents:
    """Split the stored body pieces into events, each timed by the piece that ended it."""
    body = b"".join(pieces)
    if b"\r" in body:
        return _split_incremental(pieces, times)
    # The common case, done by C loops: one split of the whole body, then each event's end
    # offset is mapped to the piece (and so the read) that carried its final byte.
    out = SSEEvents([], [])
    out_times, out_data = out.times, out.data
    ends = list(accumulate(map(len, pieces)))
    blocks = body.split(b"\n\n")
    pos = 0
    for block in blocks[:-1]:
        pos += len(block) + 2
        if not block:
            continue
        t = times[bisect_left(ends, pos)]
        if block[:6] == b"data: " and b"\n" not in block:  # the usual one-line event
            out_times.append(t)
            out_data.append(block[6:])
        else:
            _add_block(out, block, t)
    rest = blocks[-1].strip(b"\n")
    if rest:  # body ended without the final blank line
        _add_block(out, rest, times[-1])
    return out


def _split_incremental(pieces: list[bytes], times: list[float]) -> SSEEvents:
    """CR or CRLF line endings: normalize piece by piece, minding a CRLF split across reads."""
    out = SSEEvents([], [])
    buf = b""
    for piece, t in zip(pieces, times):
        buf = buf + piece if buf else piece
        held = b""
        if buf.endswith(b"\r"):  # maybe the first half of a CRLF: hold it back
            buf, held = buf[:-1], b"\r"
        buf = _normalize(buf)
        if b"\n\n" in buf:
            *blocks, buf = buf.split(b"\n\n")
            for block in blocks:
                if block:
                    _add_block(out, block, t)
        buf += held
    rest = _normalize(buf).strip(b"\n")
    if rest and times:
        _add_block(out, rest, times[-1])
    return out


def _add_block(out: SSEEvents, block: bytes, t: float) -> None:
    data_lines: list[bytes] = []
    recognised = False
    for line in block.split(b"\n"):
        if not line:
            continue
        if line[:1] == b":":
            recognised = True  # comment / keep-alive
            continue
        name, colon, value = line.partition(b":")
        if not colon or name not in KNOWN_FIELDS:
            continue
        recognised = True
        if name == b"data":
            data_lines.append(value[1:] if value[:1] == b" " else value)
    if not recognised:
        if out.malformed is None and block.strip():
            out.malformed = block
        return
    if data_lines:
        out.times.append(t)
        out.data.append(data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines))
