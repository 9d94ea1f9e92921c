"""Plotly figures as plain dicts (data + layout), small enough for a 100k-request report.

Figures are built as dicts rather than `plotly.graph_objects` because
validation of graph objects costs more than the whole diagnosis on a big run,
and the report only needs JSON. Point clouds are downsampled for the chart
(never for the numbers): an evenly spaced sample plus every point above the
p99, so the spikes a reader looks for are always drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_POINTS = 2500
MAX_TAIL_POINTS = 500


def sample_indices(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices to draw: all when few; else an even stride plus the worst 1% (capped)."""
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    stride = np.linspace(0, n - 1, max_points - MAX_TAIL_POINTS).astype(np.int64)
    finite = np.where(np.isfinite(y), y, -np.inf)
    tail_n = min(MAX_TAIL_POINTS, max(1, n // 100))
    tail = np.argpartition(finite, n - tail_n)[n - tail_n:]
    return np.unique(np.concatenate([stride, tail]))


def _clean(values: np.ndarray, digits: int = 6) -> list[Any]:
    arr = np.round(np.asarray(values, dtype=np.float64), digits)
    return [None if not np.isfinite(v) else float(v) for v in arr]


def layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    base = {
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 45},
        "height": 320,
        "legend": {"orientation": "h", "y": -0.25},
        # plotly.js takes a template object, not plotly.py's named templates: style directly.
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, sans-serif", "size": 12, "color": "#1f2933"},
    }
    base.update(extra)
    return base


def scatter(x: np.ndarray, y: np.ndarray, name: str, *, scale: float = 1.0, mode: str = "markers", max_points: int = MAX_POINTS, **extra: Any) -> dict[str, Any]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) * scale
    idx = sample_indices(y, max_points) if mode == "markers" else _even(len(y), max_points)
    order = idx[np.argsort(x[idx], kind="stable")]
    trace = {"type": "scatter", "mode": mode, "name": name, "x": _clean(x[order], 4), "y": _clean(y[order])}
    if mode == "markers":
        trace["marker"] = {"size": 4, "opacity": 0.6}
    trace.update(extra)
    return trace


def _even(n: int, max_points: int) -> np.ndarray:
    return np.arange(n) if n <= max_points else np.linspace(0, n - 1, max_points).astype(np.int64)


def line(x: Any, y: Any, name: str, *, scale: float = 1.0, **extra: Any) -> dict[str, Any]:
    return scatter(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), name, scale=scale, mode="lines", **extra)


def bar(x: list[Any], y: list[Any], name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "bar", "name": name, "x": list(x), "y": _clean(np.asarray(y, dtype=np.float64)), **extra}


def figure(traces: list[dict[str, Any]], title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    fig = {"data": traces, "layout": layout(title, x_title, y_title, **extra)}
    if "yaxis2" in extra:  # room for the right-hand axis title; rates and counts start at zero
        fig["layout"]["margin"] = {**fig["layout"]["margin"], "r": 70}
        fig["layout"]["yaxis2"] = {"rangemode": "tozero", "showgrid": False, **extra["yaxis2"]}
    return fig


def bin_count(n_events: int, span_s: float, *, per_bin: int = 10, min_width_s: float = 0.5, most: int = 60) -> int:
    """Time bins for a series: enough events per bin to be a rate or a percentile, not noise."""
    by_events = n_events // per_bin
    by_time = int(span_s / min_width_s) if span_s > 0 else 1
    return max(3, min(most, by_events, by_time))


def binned_quantiles(t: np.ndarray, y: np.ndarray, bins: int, qs: tuple[float, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per time bin: bin centre and the quantiles of y (NaN for empty bins)."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(t) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if t.size == 0:
        return np.empty(0), [np.empty(0) for _ in qs]
    edges = np.linspace(t.min(), t.max() + 1e-9, bins + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    order = np.argsort(which, kind="stable")
    which, y = which[order], y[order]
    starts = np.searchsorted(which, np.arange(bins))
    ends = np.searchsorted(which, np.arange(bins), side="right")
    out = [np.full(bins, np.nan) for _ in qs]
    for b in range(bins):
        if ends[b] > starts[b]:
            chunk = y[starts[b]:ends[b]]
            for i, q in enumerate(qs):
                out[i][b] = np.quantile(chunk, q)
    return (edges[:-1] + edges[1:]) / 2, out


def rate_per_bin(t: np.ndarray, weights: np.ndarray | None, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Events (or summed weights) per second in each time bin."""
    t = np.asarray(t, dtype=np.float64)
    keep = np.isfinite(t)
    if not keep.any():
        return np.empty(0), np.empty(0)
    w = None if weights is None else np.nan_to_num(np.asarray(weights, dtype=np.float64))[keep]
    counts, edges = np.histogram(t[keep], bins=bins, weights=w)
    width = np.diff(edges)
    return (edges[:-1] + edges[1:]) / 2, counts / np.where(width > 0, width, 1)
