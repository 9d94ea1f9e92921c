"""The one JSON writer of the run directory: atomic, and NaN-safe.

NaN and infinity are not JSON, and numpy scalars are not Python numbers:
`to_jsonable` turns the first into null and the second into plain values,
recursively, so every file servescope writes (run.json, summary.json,
findings.json, capacity.json, comparison JSON, chart data inside reports)
parses in any JSON reader. Files are replaced atomically (a temporary name,
then a rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from servescope.rundir.schema import RunDirError


def to_jsonable(value: Any) -> Any:
    """`value` with NaN/inf as None, numpy scalars and arrays as Python values, dataclasses as dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return to_jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """JSON text of `value` (see `to_jsonable`); `indent=None` gives the compact form."""
    separators = (",", ":") if indent is None else None
    return json.dumps(to_jsonable(value), indent=indent, separators=separators, allow_nan=False)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path`, replacing it atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (the run died mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # torn final write: everything before it is intact
            raise RunDirError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return rows
