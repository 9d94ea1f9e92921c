"""Small helpers shared by the diagnosis rules (formatting and guards)."""

from __future__ import annotations

import numpy as np

from servescope.units import format_duration

# Findings speak in the unit people read latencies in: `123.4 ms`, `2.50 s`.
ms = format_duration


def median(values) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def effect_ratio(*ratios: float | None) -> float | None:
    """The largest known of several slowdown ratios (affected over the rest), the `effect` of a finding."""
    known = [r for r in ratios if r is not None and np.isfinite(r)]
    return float(max(known)) if known else None


def share_effect(share: float, medium_share: float) -> float:
    """The `effect` of a share-based rule: 1 at none, 2 at the share that makes the finding medium."""
    return 1.0 + share / medium_share


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate_limited(frame) -> np.ndarray:
    """Rows the server refused with HTTP 429: the `rate_limit` rule's, left out of `errors`.

    Either spelling counts: the harness and the log importer set error_kind
    `http_429`; other writers may only keep http_status 429.
    """
    kind = frame["error_kind"].astype(object).to_numpy() == "http_429"
    status = frame["http_status"].to_numpy(dtype=np.float64) == 429
    return (kind | status) & (frame["status"].to_numpy(dtype=object) != "ok")
