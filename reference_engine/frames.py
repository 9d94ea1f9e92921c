"""Length-prefixed pickle frames over a stream socket: the wire between the HTTP process and the engine process.

A frame is a 4-byte big-endian length, then that many bytes of pickle. A stream
socket delivers bytes, not messages, so the reader keeps a buffer and hands out
only complete frames (`FrameDecoder.feed`); the same decoder serves the
non-blocking asyncio side and the engine side. Both ends are this project's own
processes on one machine, so pickle (fast, and it carries `SamplingParams` and
tuples as they are) is safe here; the socket is a private socketpair, never a
listening one.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FRAME = (1 << 32) - 1


def encode(obj: Any) -> bytes:
    """One frame holding `obj`."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a frame of {len(payload)} bytes does not fit the 4-byte length")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns received chunks into the objects of every complete frame; a partial frame waits for more."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        objects: list[Any] = []
        start = 0
        end = len(buffer)
        with memoryview(buffer) as view:  # released before the buffer is trimmed below
            while end - start >= 4:
                (size,) = _HEADER.unpack_from(view, start)
                if end - start - 4 < size:
                    break
                objects.append(pickle.loads(view[start + 4:start + 4 + size]))
                start += 4 + size
        if start:
            del buffer[:start]  # one move per chunk, not one per frame
        return objects

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)
