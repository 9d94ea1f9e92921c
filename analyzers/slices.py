"""Slicing requests by any label: the on-call view ("which requests are the slow ones?").

A dimension is a function from the request frame (with the derived columns of
`analyzers.context`) to one label per request; None means "not applicable"
(e.g. cache hit/miss on a server that does not report cached tokens) and such
requests are left out of that dimension's table.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import MIN_SAMPLES, describe
from servescope.analyzers.pools import pool_labels

TIME_WINDOWS = 10


def _column(name: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda frame: frame[name].astype(object).where(frame[name].notna(), None)


def _bands(column: str, edges: tuple[float, ...], names: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.Series]:
    def label(frame: pd.DataFrame) -> pd.Series:
        values = frame[column].to_numpy(dtype=np.float64)
        idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(names) - 1)
        return pd.Series(np.where(np.isnan(values), None, np.array(names, dtype=object)[idx]), index=frame.index)

    return label


def _time_window(frame: pd.DataFrame) -> pd.Series:
    """TIME_WINDOWS equal windows of send time, labelled by their span in seconds."""
    sent = frame["sent_at"].to_numpy(dtype=np.float64)
    if not np.isfinite(sent).any():
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    lo, hi = np.nanmin(sent), np.nanmax(sent)
    width = (hi - lo) / TIME_WINDOWS or 1.0
    # Left-padded so that sorting the labels as text keeps them in time order (titles strip it).
    names = np.array([f"{lo + i * width:7.1f}-{lo + (i + 1) * width:.1f}s" for i in range(TIME_WINDOWS)] + [None], dtype=object)
    idx = np.where(np.isfinite(sent), np.clip((sent - lo) // width, 0, TIME_WINDOWS - 1), TIME_WINDOWS).astype(np.int64)
    return pd.Series(names[idx], index=frame.index, dtype=object)


DIMENSIONS: dict[str, tuple[str, Callable[[pd.DataFrame], pd.Series]]] = {
    "prompt_bucket": ("Prompt bucket", _column("prompt_bucket")),
    "output_bucket": ("Output bucket", _column("output_bucket")),
    "cache": ("Prefix cache hit/miss", _column("cache_hit")),
    "cached_band": ("Cached share of the prompt", _bands("cached_fraction", (0.0, 1e-9, 0.25, 0.5, 0.75), ("0%", "<25%", "25-50%", "50-75%", ">=75%"))),
    "spec": ("Speculative decoding", _column("spec_on")),
    "acceptance_band": ("Speculative acceptance", _bands("acceptance", (0.0, 0.3, 0.6), ("<30%", "30-60%", ">=60%"))),
    "tenant": ("Tenant", _column("tenant")),
    "prefix_group": ("Prefix group", _column("prefix_group")),
    "phase": ("Phase", _column("phase")),
    "time_window": ("Time window (by send time)", _time_window),
    "status": ("Status", lambda frame: frame["status"].fillna("error").astype(object)),
    "pool": ("Pool that finished the request (disaggregated serving)", pool_labels),
}


def labels(frame: pd.DataFrame, dimension: str) -> pd.Series:
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown slice dimension {dimension!r}; known: {', '.join(DIMENSIONS)}")
    return DIMENSIONS[dimension][1](frame)


# (frame rows, their group codes, number of groups) -> the ITL distribution of each group
ItlByGroup = Callable[[pd.Index, np.ndarray, int], list[dict[str, Any]]]


def slice_table(frame: pd.DataFrame, dimension: str, itl_by_group: ItlByGroup | None = None) -> list[dict[str, Any]]:
    """One row per label value: counts, error share and TTFT / TPOT / ITL / E2E distributions (ok requests).

    ITL needs `itl_by_group` (DiagnosisContext.itl_by_group): the gaps live flattened beside
    the frame, not in it. Without it the ITL entry is an empty distribution.
    """
    keys = labels(frame, dimension)
    rows = []
    total = int(keys.notna().sum())
    groups = list(frame.groupby(keys, sort=True, dropna=True))
    itl = [describe([], with_ci=False) for _ in groups]
    if itl_by_group is not None and groups:
        oks = [group.index[(group["status"] == "ok").to_numpy()] for _, group in groups]
        codes = np.concatenate([np.full(len(ix), g, dtype=np.int16) for g, ix in enumerate(oks)])
        itl = itl_by_group(oks[0].append(oks[1:]), codes, len(groups))
    for (value, group), itl_dist in zip(groups, itl):
        ok = group[group["status"] == "ok"]
        rows.append({
            "value": str(value),
            "n": int(len(group)),
            "share": len(group) / total if total else 0.0,
            "errors": int(((group["status"] != "ok") & (group["status"] != "cancelled")).sum()),
            "ttft_s": describe(ok["ttft_s"].to_numpy(dtype=np.float64), with_ci=False),
            "tpot_s": describe(ok["tpot_s"].to_numpy(dtype=np.float64), with_ci=False),
            "itl_s": itl_dist,
            "e2e_s": describe(ok["e2e_s"].to_numpy(dtype=np.float64), with_ci=False),
            "low_n": len(ok) < MIN_SAMPLES,
        })
    return rows


def all_slice_tables(frame: pd.DataFrame, itl_by_group: ItlByGroup | None = None) -> list[dict[str, Any]]:
    """Tables for every dimension with at least two values (a single value slices nothing)."""
    tables = []
    for dim, (title, _) in DIMENSIONS.items():
        rows = slice_table(frame, dim, itl_by_group)
        if len(rows) >= 2:
            tables.append({"dimension": dim, "title": title, "rows": rows})
    return tables
