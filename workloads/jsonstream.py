"""Read JSON records from disk one at a time (never a whole multi-GB file).

`iter_json_array` is hand-written because the standard library has no streaming
JSON parser and servescope avoids a dependency (ijson) for this one job: it
decodes one array element at a time with `json.JSONDecoder.raw_decode` from a
buffer that is refilled in chunks, so memory stays at about one element.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from servescope.workloads.errors import WorkloadError

CHUNK_CHARS = 1 << 16
_DECODER = json.JSONDecoder()
_WS = " \t\r\n"


def iter_json_array(fh: TextIO, source: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array, reading `fh` incrementally."""
    buf = fh.read(CHUNK_CHARS).lstrip(_WS)
    if not buf.startswith("["):
        raise WorkloadError("expected a JSON array (`[...]`) at the top of the file", source=source)
    buf, pos, eof, index = buf[1:], 0, False, 0
    while True:
        while pos < len(buf) and buf[pos] in _WS:
            pos += 1
        if pos >= len(buf) and not eof:
            buf, pos = fh.read(CHUNK_CHARS), 0
            eof = not buf
            continue
        if pos >= len(buf):
            raise WorkloadError("the JSON array is not closed with `]`", source=source)
        if buf[pos] == "]":
            return
        if index and buf[pos] == ",":
            pos += 1
            continue
        while True:
            try:
                item, end = _DECODER.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                if eof:
                    raise WorkloadError(f"malformed JSON in element {index}: {exc.msg}", source=source) from None
                more = fh.read(max(CHUNK_CHARS, len(buf)))  # grow geometrically: no quadratic re-parsing
                eof = not more
                buf, pos = buf[pos:] + more, 0
        yield item
        index += 1
        buf, pos = buf[end:], 0


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkloadError(f"line {lineno} is not valid JSON: {exc.msg}", source=str(path)) from None


def first_record(path: Path) -> Any:
    """The first JSON object of a .jsonl file (for format detection), or None."""
    for _, obj in iter_jsonl(path):
        return obj
    return None
