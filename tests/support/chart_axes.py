"""Do a drawn chart's axes frame what it shows? Read from the rendered page, judged in range units.

plotly keeps an axis's `range` in its own units: log10 of the value on a log
axis, the value itself on a linear one. Trace points and shapes are given in
data units (a log axis takes their log10); annotations on a log axis are given
in log10 units already. `problems(chart)` converts each to range units and
lists what lies outside its axis, and any axis whose range runs far beyond
what it frames (more than MAX_DECADES decades on a log axis, more than
MAX_LINEAR_SPAN_FACTOR times the data's extent, or of 1 for all-zero data,
on a linear one).
"""

from __future__ import annotations

import math
from typing import Any

MAX_DECADES = 6.0
MAX_LINEAR_SPAN_FACTOR = 10.0

# For every drawn plot: its axes (type, range) and, per axis, the visible traces' values with their
# error bars, the shapes' and the annotations' positions. Hidden traces ('legendonly') are left out:
# plotly leaves them out of the autorange too.
CHART_FRAMES_JS = r"""
() => Array.from(document.querySelectorAll('.js-plotly-plot')).map((gd) => {
  const fl = gd._fullLayout;
  const axes = {};
  Object.keys(fl).filter((k) => /^[xy]axis\d*$/.test(k)).forEach((k) => {
    const ax = fl[k];
    axes[ax._id] = {type: ax.type, range: ax.range.slice()};
  });
  const num = (v) => (typeof v === 'number' && isFinite(v)) ? v : null;
  const bars = (err, values) => {
    if (!err || err.visible === false || !Array.isArray(values)) { return null; }
    const plus = [], minus = [];
    values.forEach((v, i) => {
      const up = err.type === 'data' ? (err.array || [])[i] : 0;
      const down = err.type === 'data' ? (err.symmetric === false ? (err.arrayminus || [])[i] : up) : 0;
      plus.push(num(v) === null ? null : v + (num(up) || 0));
      minus.push(num(v) === null ? null : v - (num(down) || 0));
    });
    return plus.concat(minus);
  };
  const traces = gd._fullData.filter((t) => t.visible === true).map((t) => ({
    name: t.name, type: t.type, xaxis: t.xaxis, yaxis: t.yaxis,
    x: Array.isArray(t.x) ? Array.from(t.x) : [], y: Array.isArray(t.y) ? Array.from(t.y) : [],
    x_err: bars(t.error_x, t.x), y_err: bars(t.error_y, t.y),
  }));
  const shapes = (fl.shapes || []).filter((s) => s.visible !== false).map((s) => ({
    xref: s.xref, yref: s.yref, x: [s.x0, s.x1], y: [s.y0, s.y1],
  }));
  const annotations = (fl.annotations || []).filter((a) => a.visible !== false).map((a) => ({
    text: a.text, xref: a.xref, yref: a.yref, x: a.x, y: a.y,
  }));
  const title = fl.title && fl.title.text;
  return {id: gd.id, title: title, axes: axes, traces: traces, shapes: shapes, annotations: annotations};
})
"""


def _to_range(value: Any, axis: dict[str, Any], *, log_units: bool = False) -> float | None:
    """A position in the axis's range units; None where it is not a finite number (or not positive on a log axis)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if axis["type"] == "log" and not log_units:
        return math.log10(value) if value > 0 else None
    return float(value)


def _axis_id(ref: str | None, letter: str) -> str | None:
    """'y2' for a trace's 'y2' or a shape's 'y2'; None for 'paper' and 'y domain' references."""
    if not ref or "domain" in ref or ref == "paper":
        return None
    return ref if ref.startswith(letter) else None


def framed_values(chart: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per axis id: 'data' (trace points, error bars, shapes) and 'labels' (annotations), in range units."""
    out: dict[str, dict[str, list[float]]] = {aid: {"data": [], "labels": []} for aid in chart["axes"]}

    def add(aid: str | None, values: list[Any], kind: str, log_units: bool = False) -> None:
        if aid is None or aid not in chart["axes"] or chart["axes"][aid]["type"] not in ("linear", "log"):
            return
        axis = chart["axes"][aid]
        out[aid][kind] += [v for v in (_to_range(x, axis, log_units=log_units) for x in values) if v is not None]

    for t in chart["traces"]:
        add(_axis_id(t["xaxis"], "x"), t["x"] + (t["x_err"] or []), "data")
        add(_axis_id(t["yaxis"], "y"), t["y"] + (t["y_err"] or []), "data")
    for s in chart["shapes"]:
        add(_axis_id(s["xref"], "x"), s["x"], "data")
        add(_axis_id(s["yref"], "y"), s["y"], "data")
    for a in chart["annotations"]:
        add(_axis_id(a["xref"], "x"), [a["x"]], "labels", log_units=True)
        add(_axis_id(a["yref"], "y"), [a["y"]], "labels", log_units=True)
    return out


def problems(chart: dict[str, Any]) -> list[str]:
    """What the chart's axes fail to frame, or frame far too loosely; empty when they are right."""
    found: list[str] = []
    name = chart.get("title") or chart["id"]
    for aid, values in framed_values(chart).items():
        axis = chart["axes"][aid]
        if axis["type"] not in ("linear", "log") or not values["data"]:
            continue
        lo, hi = sorted(float(v) for v in axis["range"])
        slack = 1e-6 * max(hi - lo, 1e-12)
        for kind in ("data", "labels"):
            outside = [v for v in values[kind] if not lo - slack <= v <= hi + slack]
            if outside:
                found.append(f"{name}: {aid} ({axis['type']}) range [{lo:.4g}, {hi:.4g}] leaves out {len(outside)} "
                             f"{kind} position(s), e.g. {outside[0]:.4g}")
        d_lo, d_hi = min(values["data"]), max(values["data"])
        if axis["type"] == "log":
            if lo < d_lo - MAX_DECADES or hi > d_hi + MAX_DECADES:
                found.append(f"{name}: {aid} log range [{lo:.4g}, {hi:.4g}] (log10 units) runs more than "
                             f"{MAX_DECADES:g} decades beyond its data [{d_lo:.4g}, {d_hi:.4g}]")
        else:
            # All-zero data gets plotly's default unit range: [0, 1] frames a flat zero line well.
            extent = max(d_hi - d_lo, abs(d_lo), abs(d_hi)) or 1.0
            if hi - lo > MAX_LINEAR_SPAN_FACTOR * extent:
                found.append(f"{name}: {aid} range [{lo:.4g}, {hi:.4g}] is over {MAX_LINEAR_SPAN_FACTOR:g}x "
                             f"the extent of its data [{d_lo:.4g}, {d_hi:.4g}]")
    return found


def assert_frames(charts: list[dict[str, Any]], *, expected: int) -> None:
    """Every one of `expected` drawn charts has data and axes that frame it."""
    assert len(charts) == expected, f"{len(charts)} charts read from the page, expected {expected}"
    empty = [c.get("title") or c["id"] for c in charts if not any(framed_values(c)[a]["data"] for a in c["axes"])]
    assert not empty, f"charts with nothing drawn on a numeric axis: {empty}"
    found = [p for c in charts for p in problems(c)]
    assert not found, "\n".join(found)
