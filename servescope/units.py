"""Durations as users write them (`500ms`, `2s`, `1m`) and as servescope prints them.

One grammar for every flag, SLO and file that takes a duration, and one
format for every report, finding and console line that shows one.
"""

from __future__ import annotations

import math
import re
from typing import Any

from servescope.errors import UsageError

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s|m|h)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class DurationError(UsageError):
    """Text that is not a duration; the message shows how to write one."""


def parse_seconds(value: str | float | int) -> float:
    """Seconds from `500ms`, `2s`, `1m`, `250us`, `1h`, or a number (a bare number is seconds)."""
    if isinstance(value, bool):
        raise DurationError(f"expected a duration like 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise DurationError(
                f"cannot read {value!r} as a duration; write a number with a unit, "
                "e.g. 500ms, 2s, 1m (a bare number means seconds)"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"must be a finite, non-negative duration, got {value!r}")
    return seconds


def format_duration(seconds: Any, digits: int = 1) -> str:
    """`12.3 ms` below one second, `4.56 s` above, `1,234 s` from 100 s; `–` when unknown."""
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if not math.isfinite(seconds):
        return "–"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.{digits}f} ms"
    return f"{seconds:.2f} s" if abs(seconds) < 100 else f"{seconds:,.0f} s"
