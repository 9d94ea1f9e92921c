"""Rule `stall`: the whole server stopped for a while, and every request in flight waited.

A serving engine under any load emits a steady stream of events (first
tokens, stream ends). A stall is a stretch with none at all while requests
were in flight, far longer than the usual spacing of events. This tells it
apart from the causes it resembles:

* queueing slows requests but the server keeps completing at full rate, so
  events never stop;
* a convoy (an unchunked long prefill) stops decodes for one prefill, well
  under MIN_STALL_S at today's prefill speeds; several long prompts prefilled
  back to back can stay silent longer, so a window is left to `convoy` when the
  first tokens that end it are long prompts whose prefill, within the window,
  takes at least half of it (their uncached tokens at the fastest prefill rate the run shows:
  the PREFILL_RATE_QUANTILE of uncached prompt tokens per second of TTFT over
  long prompts, each a lower bound of the server's rate);
* requests of every prompt size are in flight across the window: the stop is
  not about what was asked.
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import ms, pct, share_effect

MIN_EVENTS = 100  # 50 requests: enough for the typical spacing to mean something
MIN_STALL_S = 2.0
MIN_SPACING_FACTOR = 30.0  # a silent window is at least this many typical event spacings
MIN_IN_FLIGHT = 3
LONG_PROMPT_FACTOR = 4.0  # a long prompt, as `convoy` counts one: at least this many times the median
PREFILL_RATE_QUANTILE = 0.9
PREFILL_SHARE_OF_WINDOW = 0.5  # a window whose closing prefills take this share of it is theirs
HIGH_SHARE, MEDIUM_SHARE = 0.05, 0.01  # share of requests caught in a stall


def stall(ctx: DiagnosisContext) -> Finding | None:
    ok = ctx.ok
    first = ok["first_token_at"].to_numpy(dtype=np.float64)
    end = ok["end_at"].to_numpy(dtype=np.float64)
    sent = ok["sent_at"].to_numpy(dtype=np.float64)
    events = np.sort(np.concatenate([first[np.isfinite(first)], end[np.isfinite(end)]]))
    if len(events) < MIN_EVENTS:
        return None
    spacing = np.diff(events)
    typical = float(np.median(spacing[spacing > 0])) if (spacing > 0).any() else 0.0
    threshold = max(MIN_STALL_S, MIN_SPACING_FACTOR * typical)
    candidates = np.flatnonzero(spacing >= threshold)
    if candidates.size == 0:
        return None
    prompt = ok["prompt_tokens"].to_numpy(dtype=np.float64)
    median_prompt = float(np.nanmedian(prompt))
    prefill_s = _closing_prefill_s(ok, prompt, median_prompt)
    # Each window looks only at the requests that can touch it, found by bisection: sent at most the
    # longest E2E before it, or first tokens at its end. A mask over every request per window made a
    # million-row run with a thousand pauses quadratic.
    by_sent = np.argsort(sent, kind="stable")
    sent_sorted = sent[by_sent]
    by_first = np.argsort(first, kind="stable")  # NaN (no first token) sorts last and is never bisected to
    first_sorted = first[by_first]
    longest = float(np.nanmax(end - sent))
    windows, caught, prefill_windows = [], np.zeros(len(ok), bool), 0
    for i in candidates:
        start, stop = float(events[i]), float(events[i + 1])
        before = by_sent[np.searchsorted(sent_sorted, start - longest, side="left"):np.searchsorted(sent_sorted, start, side="left")]
        in_flight = before[end[before] > stop]
        if len(in_flight) < MIN_IN_FLIGHT:
            continue  # nothing was waiting: an idle server is silent too
        # first tokens at the window's end (within one typical spacing), each prefill only as long as it was there
        closing = by_first[np.searchsorted(first_sorted, stop, side="left"):np.searchsorted(first_sorted, stop + typical, side="right")]
        closing = closing[sent[closing] < stop]
        window_prefill = np.minimum(prefill_s[closing], stop - np.maximum(sent[closing], start)).sum()
        if window_prefill >= PREFILL_SHARE_OF_WINDOW * (stop - start):
            prefill_windows += 1
            continue  # the server was prefilling the long prompts that end the silence: a convoy
        sizes = prompt[in_flight]
        caught[in_flight] = True
        caught[by_sent[np.searchsorted(sent_sorted, start, side="left"):np.searchsorted(sent_sorted, stop, side="left")]] = True
        windows.append({"start_s": start, "end_s": stop, "depth_s": stop - start, "in_flight": int(len(in_flight)),
                        "short_prompts_in_flight": int((sizes <= median_prompt).sum()),
                        "long_prompts_in_flight": int((sizes > median_prompt).sum())})
    if not windows:
        return None
    share = float(caught.mean())
    severity = "high" if share >= HIGH_SHARE else "medium" if share >= MEDIUM_SHARE else "low"
    total = sum(w["depth_s"] for w in windows)
    return Finding(
        rule="stall",
        severity=severity,
        title=f"The server stopped {len(windows)} time(s), {ms(total)} in all",
        summary=(
            f"{len(windows)} window(s) with no first token and no completion although requests were in flight "
            f"(longest {ms(max(w['depth_s'] for w in windows))}, typical event spacing {ms(typical)}); "
            f"{pct(share)} of the requests were in flight or sent during one. Short and long prompts waited alike."
        ),
        evidence={"windows": windows[:50], "windows_total": len(windows), "stalled_s": total,
                  "typical_event_spacing_s": typical, "threshold_s": threshold, "requests_caught": int(caught.sum()),
                  "silences_ended_by_long_prefills": prefill_windows,
                  "requests": int(len(ok)), "n": int(caught.sum()), "effect": share_effect(share, MEDIUM_SHARE)},
        slices=[{"dimension": "time_window", "value": f"{w['start_s']:.1f}-{w['end_s']:.1f} s"} for w in windows[:10]],
        suggestion="Look for what pauses the whole engine at those times: garbage collection, a blocking "
                   "checkpoint or weight load, host memory swapping, a stuck collective, or a KV transfer.",
        chart=charts.figure([charts.bar([round(w["start_s"], 1) for w in windows], [w["depth_s"] for w in windows],
                                        "stall length (s)")], "Server stalls", "start (s in run)", "length (s)"),
        _affected=ok["request_id"].to_numpy(dtype=object)[caught],
    )


def _closing_prefill_s(ok, prompt: np.ndarray, median_prompt: float) -> np.ndarray:
    """Per request: how long its prefill takes at the run's fastest prefill rate, if its prompt is long; else 0."""
    cached = np.nan_to_num(ok["cached_tokens"].to_numpy(dtype=np.float64))
    uncached = np.nan_to_num(prompt) - cached
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    is_long = prompt >= LONG_PROMPT_FACTOR * max(median_prompt, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = uncached[is_long] / ttft[is_long]
    rates = rates[np.isfinite(rates) & (rates > 0)]
    if rates.size == 0:
        return np.zeros(len(ok))
    rate = float(np.quantile(rates, PREFILL_RATE_QUANTILE))
    return np.where(is_long, uncached / rate, 0.0)
