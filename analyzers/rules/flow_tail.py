"""Rule `flow_tail`: which step of a scripted task (or the time between its calls) makes its slow flows slow.

Per user class and task with at least MIN_FLOWS successful flows, the slow
flows (the slowest SLOW_SHARE by duration, at least MIN_SLOW) are set against
the typical ones (the middle half, p25-p75). Each flow's duration is split into
parts that add up to it (`analyzers.flow_parts`: each step's calls, and the
time no call covered). A part dominates when it holds at least DOMINANT_SHARE
of the slow flows' excess mean duration over the typical ones, at least
LEAD_FACTOR times the next part's share, and is larger in the slow flows beyond
chance (Mann-Whitney p < MAX_P). A tail spread over every part (every step a
little slower, the way noise does) names no step, and the rule stays silent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.flow_parts import BETWEEN_CALLS, flow_parts
from servescope.analyzers.flows import measured_flows
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import median, ms, pct

MIN_FLOWS = 50
MIN_SLOW = 5
SLOW_SHARE = 0.10
DOMINANT_SHARE = 0.5
LEAD_FACTOR = 2.0
MAX_P = 1e-3
MIN_TAIL_RATIO = 1.2  # slow flows' mean duration over the typical ones': below it there is no tail to explain
MEDIUM_TAIL_RATIO = 2.0
CHART_PARTS = 6
MAX_EFFECT = 1000.0
CALL_COLUMNS = ("flow_id", "user_class", "task", "step", "sent_at", "end_at", "status", "ttft_s", "tpot_s",
                "prompt_tokens", "cached_tokens")


def flow_tail(ctx: DiagnosisContext) -> Finding | None:
    flows = measured_flows(ctx.run.flows)
    flows = flows[(flows["status"] == "ok") & np.isfinite(flows["duration_s"].to_numpy(dtype=np.float64))]
    if len(flows) < MIN_FLOWS:
        return None
    # Only the columns the rule reads, ids as Python strings: filtering the whole request frame
    # (token gaps included) by flow, once per task, cost more than the rest of the rule.
    calls = ctx.frame.loc[ctx.frame["flow_id"].notna(), list(CALL_COLUMNS)].astype({"flow_id": object})
    by_task = dict(iter(calls.groupby(["user_class", "task"], sort=False)))
    flows = flows.astype({"flow_id": object})
    found = []
    for (user_class, task), group in flows.groupby(["user_class", "task"], sort=True):
        if len(group) >= MIN_FLOWS and (user_class, task) in by_task:
            entry = _judge_task(group, by_task[(user_class, task)])
            if entry is not None:
                found.append({"user_class": str(user_class), "task": str(task), **entry})
    if not found:
        return None
    found.sort(key=lambda e: -e["explained_s"])
    top = found[0]
    return Finding(
        rule="flow_tail",
        severity="medium" if top["tail_ratio"] >= MEDIUM_TAIL_RATIO else "low",
        title=f"Slow {top['user_class']}.{top['task']} flows are slow in {_part_text(top['part'])}",
        summary=_summary(top) + (f" {len(found) - 1} other task(s) have a dominant part too." if len(found) > 1 else ""),
        evidence={**{k: v for k, v in top.items() if k != "chart_parts"}, "n": top["slow_flows"],
                  "effect": top["part_ratio"], "other_tasks": [_brief(e) for e in found[1:10]]},
        slices=[{"dimension": "task", "value": f"{e['user_class']}.{e['task']}", "part": e["part"]} for e in found[:10]],
        suggestion=_suggestion(top),
        chart=_chart(top),
    )


def _judge_task(group: pd.DataFrame, calls: pd.DataFrame) -> dict[str, Any] | None:
    duration = group["duration_s"].to_numpy(dtype=np.float64)
    slow_n = max(MIN_SLOW, int(np.ceil(SLOW_SHARE * len(duration))))
    cut = np.partition(duration, len(duration) - slow_n)[len(duration) - slow_n]
    slow = duration >= cut
    q25, q75 = np.quantile(duration, [0.25, 0.75])
    typical = (duration >= q25) & (duration <= q75) & ~slow
    if typical.sum() < MIN_SLOW:
        return None
    tail_ratio = duration[slow].mean() / max(duration[typical].mean(), 1e-9)
    excess = duration[slow].mean() - duration[typical].mean()
    if tail_ratio < MIN_TAIL_RATIO or excess <= 0:
        return None
    parts = flow_parts(group, calls)
    slow_mean, typical_mean = parts[slow].mean(), parts[typical].mean()
    shares = ((slow_mean - typical_mean) / excess).sort_values(ascending=False)
    part, share = str(shares.index[0]), float(shares.iloc[0])
    runner_up = float(shares.iloc[1]) if len(shares) > 1 else 0.0
    if share < DOMINANT_SHARE or share < LEAD_FACTOR * max(runner_up, 0.0):
        return None
    p_value = float(mannwhitneyu(parts[part].to_numpy()[slow], parts[part].to_numpy()[typical],
                                 alternative="greater", method="asymptotic").pvalue)
    if p_value >= MAX_P:
        return None
    part_ratio = min(MAX_EFFECT, float(slow_mean[part] / max(typical_mean[part], excess / MAX_EFFECT)))
    entry: dict[str, Any] = {
        "part": part, "share": share, "runner_up_share": runner_up, "p_value": p_value,
        "slow_flows": int(slow.sum()), "typical_flows": int(typical.sum()), "flows": int(len(duration)),
        "slow_threshold_s": float(cut),
        "duration_p50_typical_s": float(np.median(duration[typical])), "duration_p50_slow_s": float(np.median(duration[slow])),
        "tail_ratio": float(tail_ratio), "excess_s": float(excess), "explained_s": float(share * excess * slow.sum()),
        "part_mean_typical_s": float(typical_mean[part]), "part_mean_slow_s": float(slow_mean[part]), "part_ratio": part_ratio,
        "shares": {str(k): float(v) for k, v in shares.items()},
        "chart_parts": {"typical": typical_mean.to_dict(), "slow": slow_mean.to_dict()},
    }
    if part != BETWEEN_CALLS:
        entry["calls"] = _step_calls(group, calls, part, slow, typical)
    return entry


def _step_calls(group: pd.DataFrame, calls: pd.DataFrame, part: str, slow: np.ndarray, typical: np.ndarray) -> dict[str, Any]:
    """The dominant step's calls in slow against typical flows: TTFT, TPOT, prompt and cached tokens (medians)."""
    step = float(part.split()[-1]) if part.split()[-1].isdigit() else np.nan
    ids = group["flow_id"].to_numpy(dtype=object)
    mine = calls[calls["step"].to_numpy(dtype=np.float64) == step]
    out = {}
    for name, chosen in (("slow", set(ids[slow])), ("typical", set(ids[typical]))):
        rows = mine[mine["flow_id"].isin(chosen)]
        ok = rows[rows["status"] == "ok"]
        out[name] = {"calls": int(len(rows)), "ttft_p50_s": median(ok["ttft_s"]), "tpot_p50_s": median(ok["tpot_s"]),
                     "prompt_tokens_p50": median(rows["prompt_tokens"]), "cached_tokens_p50": median(rows["cached_tokens"])}
    return out


def _part_text(part: str) -> str:
    return "the time between their calls" if part == BETWEEN_CALLS else part


def _summary(e: dict[str, Any]) -> str:
    text = (
        f"The slowest {e['slow_flows']} of {e['flows']} successful {e['user_class']}.{e['task']} flows "
        f"(p50 {ms(e['duration_p50_slow_s'])} against {ms(e['duration_p50_typical_s'])} for the middle half, "
        f"n={e['typical_flows']}) spend {ms(e['part_mean_slow_s'])} in {_part_text(e['part'])} on average against "
        f"{ms(e['part_mean_typical_s'])}: {pct(e['share'])} of their excess duration "
        f"(the next part: {pct(max(e['runner_up_share'], 0.0))}; Mann-Whitney p = {e['p_value']:.1e})."
    )
    calls = e.get("calls")
    if calls and calls["slow"]["ttft_p50_s"] is not None and calls["typical"]["ttft_p50_s"] is not None:
        text += (f" Its calls in the slow flows: TTFT p50 {ms(calls['slow']['ttft_p50_s'])} against "
                 f"{ms(calls['typical']['ttft_p50_s'])}, TPOT p50 {ms(calls['slow']['tpot_p50_s'])} against "
                 f"{ms(calls['typical']['tpot_p50_s'])}.")
    return text


def _suggestion(e: dict[str, Any]) -> str:
    if e["part"] == BETWEEN_CALLS:
        return ("The server is not what the slow flows wait on: time the script's own work between calls "
                "(tool calls, retrieval, parsing, think time inside the task) or the client machine.")
    calls = e.get("calls") or {}
    slow, typical = calls.get("slow", {}), calls.get("typical", {})
    if (slow.get("ttft_p50_s") or 0) > 2 * (typical.get("ttft_p50_s") or np.inf):
        return (f"{e['part']} waits for its first token in the slow flows: compare its cached tokens with the typical "
                "flows' (the Flows section's step table) for a context that misses the prefix cache, and look for "
                "queueing or a convoy at those times.")
    return (f"Look at {e['part']}'s calls in the Flows section's step table (TTFT, TPOT, prompt and cached tokens "
            "by step): a longer output or a slower decode in the slow flows, or give that call its own SLO.")


def _brief(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in ("user_class", "task", "part", "share", "slow_flows", "tail_ratio", "p_value")}


def _chart(e: dict[str, Any]) -> dict[str, Any]:
    typical, slow = e["chart_parts"]["typical"], e["chart_parts"]["slow"]
    order = sorted(slow, key=lambda p: -abs(slow[p] - typical[p]))
    shown, rest = order[:CHART_PARTS], order[CHART_PARTS:]
    groups = [f"typical flows (p25-p75, n={e['typical_flows']})", f"slow flows (slowest {pct(SLOW_SHARE)}, n={e['slow_flows']})"]
    traces = [charts.bar(groups, [1e3 * typical[p], 1e3 * slow[p]], p) for p in shown]
    if rest:
        traces.append(charts.bar(groups, [1e3 * sum(typical[p] for p in rest), 1e3 * sum(slow[p] for p in rest)], "other steps"))
    return charts.figure(traces, f"Where {e['user_class']}.{e['task']} flows spend their time (mean)", "flows", "ms",
                         barmode="stack")
