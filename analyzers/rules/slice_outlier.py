"""Rule `slice_outlier`: one model, adapter, version or tenant is materially slower than the rest.

On-call complaints are often "it is slow for X": a fine-tuned model that
decodes slower, one tenant whose requests wait. Each value of each
attribution dimension is compared with all other requests, TTFT and
per-token latency (TPOT) judged separately, since they have different causes
(queueing and prefill against decode speed).

A slice is named only when the effect is material and not chance:

* at least MIN_SAMPLES successful requests on both sides;
* the ratio of medians and the Hodges-Lehmann ratio (the median of all
  slice/rest pairwise ratios) both at least MIN_RATIO; the second keeps a
  slice whose median merely lands on the other side of a bimodal mix (half
  the traffic on a slow model makes every tenant's median jump) silent;
* a one-sided Mann-Whitney test at MAX_P.

Only slower slices are named: when one slice is slow, the rest look fast.
Load-model phases (`rate=8`, `concurrency=64`) differ by design and are never
judged; only `key=value` phases with an attribution key are (the log
importer keeps the model as `model=NAME`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import ms, pct
from servescope.analyzers.slices import labels

MIN_SAMPLES = 100  # successful requests with the metric, in the slice and in the rest
MIN_RATIO = 1.5
HIGH_RATIO, HIGH_SHARE = 2.0, 0.10  # high: at least 2x, on at least a tenth of the requests
MAX_P = 1e-6
PAIR_SAMPLE = 1500  # per side, for the Hodges-Lehmann ratio (all pairs of a subsample)
PHASE_KEYS = ("model", "adapter", "version", "deployment")
METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"))


def slice_outlier(ctx: DiagnosisContext) -> Finding | None:
    ok = ctx.ok
    if len(ok) < 2 * MIN_SAMPLES:
        return None
    found: list[dict[str, Any]] = []
    dimensions = _dimensions(ok)
    for dim, keys in dimensions:
        for metric, metric_name in METRICS:
            values = ok[metric].to_numpy(dtype=np.float64)
            usable = np.isfinite(values) & (values > 0) & (keys != None)  # noqa: E711 (elementwise)
            for value in sorted({k for k in keys[usable]}, key=str):
                entry = _compare(values, usable & (keys == value), usable & (keys != value))
                if entry is not None:
                    entry.update(dimension=dim, value=str(value), metric=metric, metric_name=metric_name,
                                 share=float((keys == value).sum() / len(ok)))
                    if metric == "tpot_s":
                        entry.update(_itl_p50(ctx, ok, keys == value, usable & (keys != value)))
                    found.append(entry)
    if not found:
        return None
    found.sort(key=lambda e: -e["ratio"])
    top = found[0]
    severity = "high" if top["ratio"] >= HIGH_RATIO and top["share"] >= HIGH_SHARE else "medium"
    others = found[1:]
    return Finding(
        rule="slice_outlier",
        severity=severity,
        title=f"{top['dimension']} {top['value']} is {top['ratio']:.1f}x slower in {top['metric_name']} than the rest",
        summary=(
            f"Requests with {top['dimension']} = {top['value']} ({pct(top['share'])} of the requests) have a median "
            f"{top['metric_name']} of {ms(top['median_s'])} against {ms(top['rest_median_s'])} for the others "
            f"({top['ratio']:.1f}x, Mann-Whitney p = {top['p_value']:.1e}, {top['n']} vs {top['rest_n']} requests)."
            + (" Also: " + "; ".join(f"{e['dimension']} {e['value']} {e['ratio']:.1f}x in {e['metric_name']}"
                                     for e in others[:3]) + "." if others else "")
        ),
        evidence={"outliers": found[:10], "n": min(top["n"], top["rest_n"]), "effect": top["ratio"]},
        slices=[{"dimension": e["dimension"], "value": e["value"], "metric": e["metric"]} for e in found[:10]],
        suggestion=_suggestion(top),
        chart=charts.figure(
            [charts.bar([f"{e['metric_name']}: {e['dimension']}={e['value']}" for e in found[:6]],
                        [e["median_s"] * 1000 for e in found[:6]], "slice median (ms)"),
             charts.bar([f"{e['metric_name']}: {e['dimension']}={e['value']}" for e in found[:6]],
                        [e["rest_median_s"] * 1000 for e in found[:6]], "rest median (ms)")],
            "Slices slower than the rest", "slice", "median (ms)", barmode="group"),
        _affected=ok["request_id"].to_numpy(dtype=object)[dict(dimensions)[top["dimension"]].astype(str) == top["value"]],
    )


def _dimensions(ok: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(name, one label per ok request or None) for every attribution dimension with at least two values."""
    out = []
    codes, phases = pd.factorize(ok["phase"])  # a handful of distinct phases: parse each once, not per row
    codes = np.where(codes < 0, len(phases), codes)  # missing phase -> the trailing None
    for key in PHASE_KEYS:
        prefix = f"{key}="
        parsed = [p[len(prefix):] if isinstance(p, str) and p.startswith(prefix) else None for p in phases]
        out.append((key, np.array(parsed + [None], dtype=object)[codes]))
    out.append(("tenant", labels(ok, "tenant").to_numpy(dtype=object)))
    return [(d, k) for d, k in out if len({v for v in k if v is not None}) >= 2]


def _compare(values: np.ndarray, mine: np.ndarray, rest: np.ndarray) -> dict[str, Any] | None:
    """The slice against the rest when it is materially and significantly slower; None otherwise."""
    a, b = values[mine], values[rest]
    if a.size < MIN_SAMPLES or b.size < MIN_SAMPLES:
        return None
    med_a, med_b = float(np.median(a)), float(np.median(b))
    if med_a < MIN_RATIO * med_b:
        return None  # the cheap screen first: most slices stop here
    rng = np.random.default_rng(0)  # a fixed subsample: one run always gives one diagnosis
    sa = rng.choice(a, min(a.size, PAIR_SAMPLE), replace=False)
    sb = rng.choice(b, min(b.size, PAIR_SAMPLE), replace=False)
    hl = float(np.exp(np.median(np.log(sa)[:, None] - np.log(sb)[None, :])))
    if hl < MIN_RATIO:
        return None
    p_value = float(mannwhitneyu(a, b, alternative="greater", method="asymptotic").pvalue)
    if p_value >= MAX_P:
        return None
    return {"n": int(a.size), "rest_n": int(b.size), "median_s": med_a, "rest_median_s": med_b,
            "median_ratio": med_a / med_b, "hodges_lehmann_ratio": hl, "ratio": min(med_a / med_b, hl),
            "p_value": p_value}


def _itl_p50(ctx: DiagnosisContext, ok: pd.DataFrame, mine: np.ndarray, rest: np.ndarray) -> dict[str, Any]:
    """Median inter-token gap of the slice and of the rest (null without recorded gaps): TPOT's cross-check."""
    index = ok.index[mine].append(ok.index[rest])
    codes = np.concatenate([np.zeros(int(mine.sum()), np.int16), np.ones(int(rest.sum()), np.int16)])
    slice_itl, rest_itl = ctx.itl_by_group(index, codes, 2)
    return {"itl_p50_s": slice_itl.get("p50"), "rest_itl_p50_s": rest_itl.get("p50")}


def _suggestion(top: dict[str, Any]) -> str:
    if top["metric"] == "tpot_s":
        return (f"Decode is slower for {top['dimension']} {top['value']}: check its model size, adapter, "
                "quantization, speculative settings or the hardware it is placed on.")
    return (f"Requests of {top['dimension']} {top['value']} wait longer for their first token: check its prompt "
            "lengths, its burstiness against its quota, and whether it shares a saturated replica.")
