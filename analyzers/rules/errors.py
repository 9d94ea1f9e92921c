"""Rule `errors`: failures and timeouts by kind, and when they happened.

Cancelled requests are left out: the harness cancels what is still in flight
when a run stops, the server did not fail them. HTTP 429 refusals are left to
the `rate_limit` rule (a quota, not a failure to serve): they count in the
denominator, not among the failures.
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import pct, rate_limited, share_effect

HIGH_RATE, MEDIUM_RATE = 0.05, 0.01
TIME_BINS = 20


def errors(ctx: DiagnosisContext) -> Finding | None:
    frame = ctx.frame
    judged = frame[frame["status"] != "cancelled"]
    limited = rate_limited(judged)
    failed = judged[(judged["status"] != "ok").to_numpy() & ~limited]
    if failed.empty:
        return None
    kind = failed["error_kind"].where(failed["error_kind"].notna(), failed["status"]).fillna("error").astype(str)
    by_kind = {k: int(v) for k, v in kind.value_counts().items()}
    rate = len(failed) / len(judged)
    # A request that never got a connection has no sent_at: place it at its scheduled time.
    when = judged["sent_at"].astype("float64").fillna(judged["scheduled_at"].astype("float64")).to_numpy()
    sent = when[(judged["status"] != "ok").to_numpy() & ~limited]
    timed = bool(np.isfinite(when).any())
    messages = failed["error_message"].dropna().astype(str).str.slice(0, 200).value_counts().head(5)
    severity = "high" if rate >= HIGH_RATE else "medium" if rate >= MEDIUM_RATE else "low"
    traces = []
    if timed:
        edges = np.linspace(float(np.nanmin(when)), float(np.nanmax(when)) + 1e-9, TIME_BINS + 1)
        centres = ((edges[:-1] + edges[1:]) / 2).round(3).tolist()
        traces = [charts.bar(centres, np.histogram(sent[(kind == k).to_numpy()], bins=edges)[0], k) for k in by_kind]
    first, last = (float(np.nanmin(sent)), float(np.nanmax(sent))) if np.isfinite(sent).any() else (None, None)
    top = max(by_kind, key=by_kind.get)
    return Finding(
        rule="errors",
        severity=severity,
        title=f"{len(failed)} requests failed ({pct(rate)}), mostly {top}",
        summary=(
            f"{len(failed)} of {len(judged)} measured requests did not succeed: "
            + ", ".join(f"{v} {k}" for k, v in by_kind.items())
            + (f". The first failure was sent at {first:.1f} s, the last at {last:.1f} s." if first is not None else ".")
        ),
        evidence={
            "failed": int(len(failed)),
            "rate_limited_not_counted": int(limited.sum()),
            "judged": int(len(judged)),
            "error_rate": rate,
            "n": int(len(judged)),
            "effect": share_effect(rate, MEDIUM_RATE),
            "by_kind": by_kind,
            "first_failure_sent_s": first,
            "last_failure_sent_s": last,
            "top_messages": {str(m): int(c) for m, c in messages.items()},
            "http_status": {str(int(k)): int(v) for k, v in failed["http_status"].dropna().value_counts().items()},
        },
        slices=[{"dimension": "error_kind", "value": k, "n": v} for k, v in by_kind.items()],
        suggestion=_suggestion(top),
        chart=charts.figure(traces, "Failures over time (by send time)", "time in run (s)", "failed requests", barmode="stack")
        if traces else None,
    )


def _suggestion(kind: str) -> str:
    return {
        "timeout": "Requests ran past --timeout: the server is overloaded or stalled. Lower the rate, or raise --timeout if these outputs are legitimately long.",
        "http_5xx": "The server returned 5xx: check its logs around the failure times shown.",
        "http_4xx": "The server refused the requests as invalid: check model name, max_tokens and the prompt length against the context window.",
        "connect": "Connections were refused: the server was down or its accept backlog was full.",
        "reset": "Connections were reset mid-stream: look for server restarts or proxy timeouts.",
        "protocol": "The stream was malformed (bad SSE or JSON): the endpoint is not speaking the OpenAI streaming protocol correctly.",
    }.get(kind, "Check the error messages listed in the evidence.")
