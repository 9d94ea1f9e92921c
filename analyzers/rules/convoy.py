"""Rule `convoy`: long prefills stall short requests (head-of-line blocking).

Without chunked prefill, a long prompt's prefill occupies whole engine steps:
a short request that arrives meanwhile waits for it, and every running decode
skips a beat. Evidence from the client's own timestamps:

* short requests (prompt <= the median) are split by whether a long one
  (prompt >= 4x the median) was between its send and its first token at the
  moment the short one was sent; the TTFT of the two groups is compared. Judging
  at send time, not over the short request's whole wait, keeps slow requests
  from being "exposed" merely because they were slow;
* inter-token gaps of running streams that span a long request's first token
  (the moment its prefill finished) are compared with all other gaps.

Both must show: short requests also wait behind long prompts when the server
is merely saturated or prefills in FIFO chunks (that is queueing), but only a
prefill that monopolizes whole engine steps also stalls the running decodes,
for about as long as the short requests waited. So the decode stall must reach
half the short requests' extra wait; a chunked prefill stalls decodes by one
chunk step, far less. The two are measured on the same moments: the stall is
the gap running decodes were in when each exposed short request was sent (a
gap holding k such sends counts k times), less a normal gap. Measuring it over
the gaps that span any long prefill's end instead weighs every long prefill
alike, while the short requests land mostly in the longest ones; on a convoy
that mismatch put the ratio anywhere from 0.5 to 2. Matched, a convoy gives
about 2 (the decodes wait out the whole prefill, a short request sent into it
the rest of it: 2.0 to 2.5 over 16 simulated convoys), four times the bound.

A third test holds with or without gaps, and is what decides for a log that
has none (non-streaming, or a production log of TTFT and latency): the first
token of a short request caught behind a long prefill comes right after the
long prompt's first token, one engine step for its own prefill, because the
prefill was all it waited for: once it ended, the short request took what a
short request takes with no long prefill in flight. Under queueing its first
token comes whenever a slot frees, after the requests queued ahead of it,
seconds after the long prompt's. So for each exposed short request the time
from the next long first token after its send to its own first token is
taken (never, if its own came first); the median must stay within 3x the
clear short requests' TTFT p50. Over 8 seeds x 2 sizes of simulated runs a
convoy gives 0.9 to 1.05x; queueing 11x and more, a noisy tenant's bursts 67x
and more, long outputs 44x and more, every other incident never.
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import median, ms

LONG_FACTOR = 4.0
MIN_LONG = 3
MIN_GROUP = 5
MIN_TTFT_RATIO = 2.0
MIN_EXCESS_S = 0.005
MIN_GAP_RATIO = 2.0  # decode gaps spanning a long prefill's end vs all others
MIN_STALL_SHARE = 0.5  # decode stall excess / short requests' TTFT excess
MAX_AFTER_PREFILL_RATIO = 3.0  # exposed short requests' wait after the long first token / clear short TTFT (p50s)
MAX_GAPS = 2_000_000  # gap timing is sampled beyond this many gaps (speed on huge runs)


def convoy(ctx: DiagnosisContext) -> Finding | None:
    ok = ctx.ok
    prompt = ok["prompt_tokens"].to_numpy(dtype=np.float64)
    if len(ok) < 2 * MIN_GROUP + MIN_LONG or not np.isfinite(prompt).any():
        return None
    typical = float(np.nanmedian(prompt))
    is_long = prompt >= LONG_FACTOR * max(typical, 1.0)
    is_short = prompt <= typical
    if is_long.sum() < MIN_LONG or is_short.sum() < 2 * MIN_GROUP:
        return None
    sent = ok["sent_at"].to_numpy(dtype=np.float64)
    first = ok["first_token_at"].to_numpy(dtype=np.float64)
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    long_start, long_end = sent[is_long], first[is_long]
    exposed = _inside_any(sent[is_short], long_start, long_end)
    short_ttft = ttft[is_short]
    exposed_p50, clear_p50 = median(short_ttft[exposed]), median(short_ttft[~exposed])
    if exposed.sum() < MIN_GROUP or (~exposed).sum() < MIN_GROUP or not exposed_p50 or not clear_p50:
        return None
    ttft_ratio = exposed_p50 / clear_p50
    if ttft_ratio < MIN_TTFT_RATIO or exposed_p50 - clear_p50 < MIN_EXCESS_S:
        return None
    prefill_ends = np.sort(long_end[np.isfinite(long_end)])
    after_prefill = _wait_after_prefill(sent[is_short][exposed], first[is_short][exposed], prefill_ends)
    if after_prefill > MAX_AFTER_PREFILL_RATIO * clear_p50:
        return None  # their first tokens did not follow the long prefills': they waited in a queue
    stall = _gap_stalls(ctx, prefill_ends, np.sort(sent[is_short][exposed]))
    if stall:
        stall["stall_share_of_wait"] = (stall["itl_p50_at_exposed_send_s"] - stall["itl_p50_otherwise_s"]) / (exposed_p50 - clear_p50)
        if (stall["itl_gap_ratio"] or 0) < MIN_GAP_RATIO or stall["stall_share_of_wait"] < MIN_STALL_SHARE:
            return None  # decodes kept flowing: the wait was queueing, not a step-monopolizing prefill
    severity = "high" if ttft_ratio >= 4 else "medium"
    evidence = {
        "long_prompt_threshold_tokens": LONG_FACTOR * typical,
        "long_requests": int(is_long.sum()),
        "short_requests": int(is_short.sum()),
        "short_exposed": int(exposed.sum()),
        "short_ttft_p50_exposed_s": exposed_p50,
        "short_ttft_p50_clear_s": clear_p50,
        "short_ttft_p90_exposed_s": float(np.quantile(short_ttft[exposed], 0.9)),
        "short_ttft_p90_clear_s": float(np.quantile(short_ttft[~exposed], 0.9)),
        "ttft_ratio": ttft_ratio,
        "short_wait_after_long_first_token_p50_s": after_prefill,
        "n": int(min(exposed.sum(), (~exposed).sum())),
        "effect": ttft_ratio,
        **stall,
    }
    stall_text = ""
    if stall.get("itl_gap_ratio"):
        stall_text = (
            f" Running streams stalled too: gaps spanning a long prefill's end have a median of "
            f"{ms(stall['itl_p50_during_long_prefill_s'])} against {ms(stall['itl_p50_otherwise_s'])} otherwise."
        )
    short_sent = sent[is_short]
    chart = charts.figure(
        [
            charts.scatter(short_sent[~exposed], short_ttft[~exposed], "short, no long prefill in flight", scale=1e3),
            charts.scatter(short_sent[exposed], short_ttft[exposed], "short, long prefill in flight", scale=1e3),
        ],
        "Short requests' TTFT, by whether a long prefill was in flight at send", "send time in run (s)", "TTFT (ms)",
    )
    return Finding(
        rule="convoy",
        severity=severity,
        title=f"Long prefills stall short requests: their TTFT is {ttft_ratio:.1f}x higher behind a long prompt",
        summary=(
            f"Short requests (<= {typical:.0f} prompt tokens) sent while a long prompt (>= {LONG_FACTOR * typical:.0f} tokens) "
            f"was being prefilled waited {ms(exposed_p50)} for their first token (median of {int(exposed.sum())}), against "
            f"{ms(clear_p50)} when none was ({int((~exposed).sum())} requests). Their first tokens came "
            f"{ms(after_prefill)} after the long prompt's (median): the prefill was what they waited for.{stall_text}"
        ),
        evidence=evidence,
        slices=[{"dimension": "prompt_tokens", "value": f">= {LONG_FACTOR * typical:.0f}", "role": "cause"},
                {"dimension": "prompt_tokens", "value": f"<= {typical:.0f}", "role": "victim"}],
        suggestion=(
            "Enable chunked prefill (vLLM --enable-chunked-prefill with a --max-num-batched-tokens budget; "
            "reference engine: drop --no-chunked-prefill) so long prompts are prefilled in slices between decode steps, "
            "or route long prompts to separate replicas."
        ),
        chart=chart,
        _affected=ok["request_id"].to_numpy(dtype=object)[is_short][exposed],
    )


def _wait_after_prefill(sends: np.ndarray, firsts: np.ndarray, prefill_ends: np.ndarray) -> float:
    """Median time from the first long prefill to end after each request's send to the request's first token.

    A request whose first token came before any long prefill ended counts as infinite: it did not wait for one.
    """
    idx = np.searchsorted(prefill_ends, sends, side="right")
    ended = np.where(idx < len(prefill_ends), prefill_ends[np.minimum(idx, len(prefill_ends) - 1)], np.inf)
    after = np.where(ended <= firsts, firsts - ended, np.inf)
    return float(np.median(after)) if len(after) else float("inf")


def _inside_any(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each point: does some interval [start, end) contain it? (intervals may overlap)"""
    keep = np.isfinite(starts) & np.isfinite(ends)
    starts, ends = starts[keep], ends[keep]
    order = np.argsort(starts)
    starts, running_max_end = starts[order], np.maximum.accumulate(ends[order]) if len(ends) else ends
    idx = np.searchsorted(starts, points, side="right") - 1  # last interval starting at or before the point
    inside = np.zeros(len(points), dtype=bool)
    has = idx >= 0
    inside[has] = running_max_end[idx[has]] > points[has]
    return inside


def _gap_stalls(ctx: DiagnosisContext, prefill_ends: np.ndarray, exposed_sends: np.ndarray) -> dict:
    """Median ITL gap that spans a long prefill's end vs every other gap, and the gap in progress at exposed sends."""
    run = ctx.run
    mask = ctx.frame_mask & (run.requests["status"] == "ok").to_numpy()
    lengths = np.where(mask, run.itl_lengths, 0)
    if lengths.sum() == 0 or prefill_ends.size == 0:
        return {}
    rows = np.flatnonzero(lengths)
    if lengths.sum() > MAX_GAPS:
        rng = np.random.default_rng(0)
        keep = rng.random(len(rows)) < MAX_GAPS / lengths.sum()
        rows = rows[keep]
    all_starts = np.concatenate(([0], np.cumsum(run.itl_lengths)[:-1]))
    gaps = run.itl_values[_segments(all_starts[rows], run.itl_lengths[rows])]
    first_token = run.requests["first_token_at"].to_numpy(dtype=np.float64)[rows]
    per_row = run.itl_lengths[rows]
    row_of_gap = np.repeat(np.arange(len(rows)), per_row)
    cum = np.cumsum(gaps)
    seg_base = np.repeat(np.concatenate(([0.0], cum[np.cumsum(per_row)[:-1] - 1])), per_row)
    gap_end = first_token[row_of_gap] + (cum - seg_base)
    gap_start = gap_end - gaps
    spans = np.searchsorted(prefill_ends, gap_end, side="right") - np.searchsorted(prefill_ends, gap_start, side="right") > 0
    during, other = median(gaps[spans]), median(gaps[~spans])
    # sends in (gap_start, gap_end]: the gap those decodes were in when a short request arrived behind a long prefill
    sends_inside = np.searchsorted(exposed_sends, gap_end, side="right") - np.searchsorted(exposed_sends, gap_start, side="right")
    if during is None or other is None or not sends_inside.any():
        return {}
    at_send = float(np.quantile(gaps, 0.5, weights=sends_inside, method="inverted_cdf"))
    return {
        "itl_p50_during_long_prefill_s": during,  # "during": the gap spans a long prefill's end
        "itl_p50_at_exposed_send_s": at_send,
        "itl_p50_otherwise_s": other,
        "itl_gaps_during_long_prefill": int(spans.sum()),
        "itl_gap_ratio": during / other if other > 0 else None,
    }


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) without a Python loop."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total) + offsets
