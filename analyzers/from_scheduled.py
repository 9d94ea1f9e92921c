"""Latency from the intended send time: coordinated omission, measured.

In an open-loop run every request has a time it was meant to go out
(`scheduled_at`). A load generator that falls behind sends late, and a latency
clocked from the late send leaves out the wait a real user, arriving on
schedule, would have had: the tail looks better than what users saw. Clocked
from `scheduled_at` instead (`ttft_from_scheduled_s`, `e2e_from_scheduled_s`),
the generator's lateness counts against the run, never in its favour.

Both figures are kept for open-loop phases; they are shown side by side only
when they differ materially: the p99 from the scheduled time exceeds the p99
from the send by more than 10% of it and by more than 5 ms (`CO_RELATIVE`,
`CO_FLOOR_S`). The 10% is about the width of a p99's 95% confidence interval
at a few thousand samples, so a smaller gap is within the noise of the tail
itself; the 5 ms floor is the scale of a loaded event loop's timer jitter,
below which no one's conclusion about a serving stack changes.

Closed-loop phases are left out: a slot sends when its previous request ends,
so the load adapts to the server and there is no arrival a late send hides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import describe, quantile

CO_RELATIVE = 0.10
CO_FLOOR_S = 0.005
OPEN_LOOP_KINDS = ("rate", "trace")
PAIRS = (("ttft_s", "ttft_from_scheduled_s", "first_token_at"), ("e2e_s", "e2e_from_scheduled_s", "end_at"))


def open_loop_mask(run: dict[str, Any], frame: pd.DataFrame) -> np.ndarray:
    """Per row: was its phase open-loop? From run.json's phase kinds (`phases`, `load.phases`), else
    `load.kind`, else the phase label."""
    load = run.get("load") if isinstance(run.get("load"), dict) else {}
    kinds = {str(p.get("phase")): str(p.get("kind")) for p in [*(load.get("phases") or []), *(run.get("phases") or [])]
             if isinstance(p, dict) and p.get("kind")}
    fallback = load.get("kind")
    phase = frame["phase"].fillna("").astype(str)
    verdict = {}
    for name in phase.unique():
        kind = kinds.get(name) or fallback
        verdict[name] = kind in OPEN_LOOP_KINDS if kind else name.startswith("rate=")
    return phase.map(verdict).to_numpy(dtype=bool)


def from_scheduled_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """`ttft_from_scheduled_s`, `e2e_from_scheduled_s`: the recorded columns, or (runs written before
    they existed) the same difference taken from `scheduled_at`, which is on the same clock."""
    scheduled = frame["scheduled_at"].to_numpy(dtype=np.float64)
    out = {}
    for _, column, moment in PAIRS:
        recorded = frame[column].to_numpy(dtype=np.float64) if column in frame else np.full(len(frame), np.nan)
        out[column] = np.where(np.isfinite(recorded), recorded, frame[moment].to_numpy(dtype=np.float64) - scheduled)
    return out


def from_scheduled(ok_frame: pd.DataFrame, open_loop: np.ndarray) -> dict[str, Any] | None:
    """summary.json's `from_scheduled` block of one group's successful requests (None: no open-loop rows).

    `{"metrics": {"ttft_s": describe, "e2e_s": describe}, "differs": bool, "reasons": [...],
    "threshold": {...}}`; each p99 is compared with the send-based p99 of the same rows.
    """
    rows = ok_frame.loc[open_loop]
    if rows.empty:
        return None
    columns = from_scheduled_columns(rows)
    metrics, reasons = {}, []
    for sent_column, column, _ in PAIRS:
        values = columns[column]
        if not np.isfinite(values).any():
            continue
        metrics[sent_column] = describe(values)
        sent_p99 = quantile(rows[sent_column].to_numpy(dtype=np.float64), 0.99)
        sched_p99 = metrics[sent_column]["p99"]
        if sent_p99 is not None and sched_p99 - sent_p99 > max(CO_RELATIVE * sent_p99, CO_FLOOR_S):
            name = sent_column.removesuffix("_s").upper()
            reasons.append(f"{name} p99 from the scheduled time {sched_p99 * 1e3:.1f} ms against "
                           f"{sent_p99 * 1e3:.1f} ms from the send")
    if not metrics:
        return None
    return {"metrics": metrics, "differs": bool(reasons), "reasons": reasons,
            "threshold": {"relative": CO_RELATIVE, "floor_s": CO_FLOOR_S}}
