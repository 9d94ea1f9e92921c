"""Rule `rate_limit`: the server refused requests with HTTP 429, and who was refused when.

A 429 is the server (or a gateway) enforcing a quota, not a failure to serve:
the fix is a quota or a client's pacing, so it gets its own finding instead of
a line in `errors`. The finding names the tenants refused (count and share of
each tenant's own requests: a quota is usually per tenant), the time windows
the refusals fell in, and the Retry-After the server asked for where it is
known (the log importer appends `retry-after Ns` to error_message).
"""

from __future__ import annotations

import re

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import ms, pct, rate_limited, share_effect
from servescope.analyzers.slices import labels

HIGH_SHARE, MEDIUM_SHARE = 0.05, 0.01  # share of the measured requests refused
MIN_WINDOW_GAP_S = 5.0  # refusals closer than this (or WINDOW_GAP_SPACINGS send spacings) share a window
WINDOW_GAP_SPACINGS = 20.0
MAX_WINDOWS = 50
RETRY_AFTER = re.compile(r"retry-after\s+([0-9]*\.?[0-9]+)\s*s", re.IGNORECASE)


def rate_limit(ctx: DiagnosisContext) -> Finding | None:
    judged = ctx.frame[ctx.frame["status"] != "cancelled"]
    refused = rate_limited(judged)
    if not refused.any():
        return None
    n_refused, share = int(refused.sum()), float(refused.mean())
    severity = "high" if share >= HIGH_SHARE else "medium" if share >= MEDIUM_SHARE else "low"
    when = judged["sent_at"].astype("float64").fillna(judged["scheduled_at"].astype("float64")).to_numpy()
    tenants = _by_tenant(judged, refused)
    windows = _windows(when, refused)
    retry = _retry_after(judged["error_message"].to_numpy(dtype=object)[refused])
    who = (f" Most were {tenants[0]['tenant']}'s ({tenants[0]['refused']}, {pct(tenants[0]['share_of_tenant'])} of its requests)."
           if tenants else "")
    largest = sorted(windows, key=lambda w: -w["refused"])[:3]
    span = (f" They fell in {len(windows)} window(s); the largest: "
            + ", ".join(f"{w['start_s']:.1f}-{w['end_s']:.1f} s ({w['refused']} refused)" for w in largest) + "."
            if windows else "")
    asked = f" The server asked to retry after {ms(retry['median_s'])} (median of {retry['known']})." if retry["known"] else ""
    return Finding(
        rule="rate_limit",
        severity=severity,
        title=f"{n_refused} requests were rate limited (HTTP 429, {pct(share)})"
              + (f", mostly {tenants[0]['tenant']}" if tenants else ""),
        summary=f"The server refused {n_refused} of {len(judged)} measured requests with HTTP 429.{who}{span}{asked}",
        evidence={"refused": n_refused, "judged": int(len(judged)), "refused_share": share, "by_tenant": tenants,
                  "n": int(len(judged)), "effect": share_effect(share, MEDIUM_SHARE),
                  "windows": windows[:MAX_WINDOWS], "windows_total": len(windows), "retry_after": retry},
        slices=[{"dimension": "tenant", "value": t["tenant"], "n": t["refused"]} for t in tenants[:10]]
        + [{"dimension": "time_window", "value": f"{w['start_s']:.1f}-{w['end_s']:.1f} s", "n": w["refused"]}
           for w in largest],
        suggestion="A quota or admission limit refused these: pace the client (honour Retry-After, back off), "
                   "or raise the limit of the tenants named if their traffic is expected.",
        chart=_chart(when, refused),
    )


def _by_tenant(judged, refused: np.ndarray) -> list[dict]:
    """Tenants with refusals, most refused first; share is of that tenant's own measured requests."""
    keys = labels(judged, "tenant").to_numpy(dtype=object)
    out = []
    for value in {k for k in keys[refused] if k is not None}:
        mine = keys == value
        n = int((mine & refused).sum())
        out.append({"tenant": str(value), "refused": n, "requests": int(mine.sum()), "share_of_tenant": n / int(mine.sum()),
                    "share_of_refused": n / int(refused.sum())})
    return sorted(out, key=lambda t: (-t["refused"], t["tenant"]))


def _windows(when: np.ndarray, refused: np.ndarray) -> list[dict]:
    """Stretches of send time with refusals: consecutive refusals closer than the gap share one."""
    finite = np.isfinite(when)
    times = np.sort(when[refused & finite])
    if times.size == 0:
        return []
    sends = np.sort(when[finite])
    spacing = float(np.median(np.diff(sends))) if sends.size > 1 else 0.0
    gap = max(MIN_WINDOW_GAP_S, WINDOW_GAP_SPACINGS * spacing)
    breaks = np.flatnonzero(np.diff(times) > gap)
    starts, stops = np.concatenate(([0], breaks + 1)), np.concatenate((breaks, [times.size - 1]))
    out = []
    for a, b in zip(starts, stops):
        lo, hi = float(times[a]), float(times[b])
        sent = int(((sends >= lo) & (sends <= hi)).sum())  # every request sent in the window, refused or not
        out.append({"start_s": lo, "end_s": hi, "refused": int(b - a + 1), "sent": sent, "refused_share": float((b - a + 1) / sent)})
    return out


def _retry_after(messages: np.ndarray) -> dict:
    """Retry-After seconds parsed from the refusals' messages; counts only those that carry one."""
    values = [float(m.group(1)) for m in (RETRY_AFTER.search(str(x)) for x in messages if isinstance(x, str)) if m]
    if not values:
        return {"known": 0, "median_s": None, "max_s": None}
    return {"known": len(values), "median_s": float(np.median(values)), "max_s": float(np.max(values))}


def _chart(when: np.ndarray, refused: np.ndarray) -> dict | None:
    finite = np.isfinite(when)
    if not finite.any():
        return None
    edges = np.linspace(float(when[finite].min()), float(when[finite].max()) + 1e-9, 41)
    centres = ((edges[:-1] + edges[1:]) / 2).round(3).tolist()
    return charts.figure([charts.bar(centres, np.histogram(when[finite & ~refused], bins=edges)[0], "not refused"),
                          charts.bar(centres, np.histogram(when[finite & refused], bins=edges)[0], "HTTP 429")],
                         "Requests refused with HTTP 429 over time (by send time)", "time in run (s)", "requests",
                         barmode="stack")
