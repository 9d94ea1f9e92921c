"""Rule `spec_decode`: how often speculation was accepted, and where it costs more than it saves.

Per request the reference engine reports drafted and accepted tokens. TPOT is
compared between requests with and without speculation in the same run when
both exist, and across acceptance bands (<30%, 30-60%, >=60%). A slice
(prompt bucket, output bucket, tenant) "loses" when its acceptance is below
30% or its TPOT with speculation is worse than without.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import effect_ratio, median, ms, pct, ratio
from servescope.analyzers.slices import labels

LOW_ACCEPTANCE = 0.30
MIN_SLICE = 10
SLICE_DIMENSIONS = ("prompt_bucket", "output_bucket", "tenant")


def spec_decode(ctx: DiagnosisContext) -> Finding | None:
    ok = ctx.ok
    draft = ok["spec_draft_tokens"].to_numpy(dtype=np.float64)
    accepted = ok["spec_accepted_tokens"].to_numpy(dtype=np.float64)
    on = np.nan_to_num(draft) > 0
    server_draft = ctx.metrics.counter_increase("spec_draft")
    server_rate = ctx.metrics.gauge("spec_accept_rate")  # SGLang reports a gauge, not counters
    if on.sum():
        acceptance = float(np.nansum(accepted[on]) / np.nansum(draft[on]))
    elif server_draft > 0:
        acceptance = ctx.metrics.counter_increase("spec_accepted") / server_draft
    elif len(server_rate) and server_rate.max() > 0:
        acceptance = float(server_rate[server_rate > 0].mean())
    else:
        return None
    tpot = ok["tpot_s"].to_numpy(dtype=np.float64)
    off = ~on & np.isfinite(draft)
    bands = _bands(ok, tpot, on)
    losing = _losing_slices(ok, tpot, on, off)
    evidence = {
        "acceptance_rate": acceptance,
        "requests_with_spec": int(on.sum()),
        "requests_without_spec": int(off.sum()),
        "tpot_p50_with_s": median(tpot[on]),
        "tpot_p50_without_s": median(tpot[off]),
        "bands": bands,
        "losing_slices": losing,
        "n": int(min(on.sum(), off.sum())) if off.sum() else int(on.sum()),
    }
    # effect: how far acceptance falls short of break-even (LOW_ACCEPTANCE), or TPOT lost to speculation
    evidence["effect"] = effect_ratio(LOW_ACCEPTANCE / max(acceptance, 1e-9),
                                      ratio(evidence["tpot_p50_with_s"], evidence["tpot_p50_without_s"]))
    if server_draft > 0:
        evidence["server_acceptance_rate"] = ctx.metrics.counter_increase("spec_accepted") / server_draft
    compare = ""
    if evidence["tpot_p50_with_s"] and evidence["tpot_p50_without_s"]:
        compare = f" Median TPOT is {ms(evidence['tpot_p50_with_s'])} with speculation against {ms(evidence['tpot_p50_without_s'])} without."
    if losing or acceptance < LOW_ACCEPTANCE:
        severity = "medium"
        if losing:
            where = ", ".join(f"{s['dimension']}={s['value']} ({pct(s['acceptance'])})" for s in losing[:4])
            title = f"Speculative decoding loses where acceptance is low: {where}"
        else:
            title = f"Speculative decoding accepted only {pct(acceptance)} of drafted tokens"
        suggestion = "Turn speculation off (or draft fewer tokens, smaller k) for these slices; low acceptance means drafting costs more than it saves."
    else:
        severity = "info"
        title = f"Speculative decoding accepted {pct(acceptance)} of drafted tokens"
        suggestion = "Nothing to fix; watch the acceptance bands if the traffic mix changes."
    chart = charts.figure(
        [charts.bar([b["band"] for b in bands], [(b["tpot_p50_s"] or np.nan) * 1e3 for b in bands], "TPOT p50 (ms)")],
        "TPOT by speculative acceptance band", "acceptance band", "TPOT p50 (ms)",
    ) if bands else None
    return Finding(
        rule="spec_decode", severity=severity, title=title,
        summary=f"{pct(acceptance)} of drafted tokens were accepted over {int(on.sum())} requests with speculation.{compare}",
        evidence=evidence,
        slices=[{"dimension": s["dimension"], "value": s["value"]} for s in losing],
        suggestion=suggestion, chart=chart,
    )


def _bands(ok: pd.DataFrame, tpot: np.ndarray, on: np.ndarray) -> list[dict]:
    band = labels(ok, "acceptance_band").to_numpy(dtype=object)
    out = []
    for name in ("<30%", "30-60%", ">=60%"):
        rows = (band == name) & on
        if rows.any():
            out.append({"band": name, "n": int(rows.sum()), "tpot_p50_s": median(tpot[rows]), "low_n": bool(rows.sum() < 20)})
    return out


def _losing_slices(ok: pd.DataFrame, tpot: np.ndarray, on: np.ndarray, off: np.ndarray) -> list[dict]:
    draft = ok["spec_draft_tokens"].to_numpy(dtype=np.float64)
    accepted = ok["spec_accepted_tokens"].to_numpy(dtype=np.float64)
    out = []
    for dim in SLICE_DIMENSIONS:
        keys = labels(ok, dim).to_numpy(dtype=object)
        values = {k for k in keys if k is not None}
        if len(values) < 2:
            continue
        for value in sorted(values, key=str):
            rows_on, rows_off = (keys == value) & on, (keys == value) & off
            if rows_on.sum() < MIN_SLICE:
                continue
            acc = float(np.nansum(accepted[rows_on]) / np.nansum(draft[rows_on]))
            with_p50, without_p50 = median(tpot[rows_on]), median(tpot[rows_off]) if rows_off.sum() >= MIN_SLICE else None
            slower = with_p50 is not None and without_p50 is not None and with_p50 > without_p50
            if acc < LOW_ACCEPTANCE or slower:
                out.append({"dimension": dim, "value": str(value), "acceptance": acc, "n": int(rows_on.sum()),
                            "tpot_p50_with_s": with_p50, "tpot_p50_without_s": without_p50})
    return sorted(out, key=lambda s: s["acceptance"])
