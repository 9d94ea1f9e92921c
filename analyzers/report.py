"""`build_report(run_dir, slos=None) -> Path`: summary.json, findings.json and report.html of one run.

This module gathers what the template shows (summary, findings, slice tables,
scripted users' flows, time series, worst requests, load-generator health, metadata) and renders it
with `report_templates.render_page`. It owns no numbers of its own: those come
from `summarize`, the rules and the slice tables, so the JSON files and the
HTML always agree.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.context import DiagnosisContext, build_context
from servescope.analyzers.findings import Finding
from servescope.analyzers.flow_view import flow_view
from servescope.analyzers.rules import run_rules
from servescope.analyzers.pools import pool_view
from servescope.analyzers.slices import all_slice_tables
from servescope.analyzers.summary import summarize
from servescope.analyzers.timeseries import all_time_series
from servescope.rundir.jsonio import write_json_atomic
from servescope.rundir.reader import RunData, load_run
from servescope.rundir.schema import FINDINGS_JSON, REPORT_HTML, SUMMARY_JSON
from servescope.slo import SLO, slos_from_run

WORST_ROWS = 15
WORST_COLUMNS = ("request_id", "phase", "prompt_bucket", "output_bucket", "tenant", "prompt_tokens", "cached_tokens",
                 "output_tokens", "ttft_s", "tpot_s", "itl_max_s", "e2e_s", "status", "error_kind", "error_message")


def build_report(run_dir: str | Path, slos: list[SLO] | None = None, *, timings: dict[str, float] | None = None) -> Path:
    """Write summary.json, findings.json and report.html into run_dir; returns the report's path.

    `slos` default to the ones recorded in run.json. Pass a dict as `timings` to
    get the seconds spent in each stage (the report benchmark does).
    """
    stage = _Stopwatch(timings)
    run = load_run(run_dir)
    stage("load")
    if slos is None:
        slos = slos_from_run(run.run)
    summary = summarize(run, slos)
    stage("summarize")
    ctx = build_context(run)
    findings = run_rules(ctx)
    stage("diagnose")
    out = Path(run_dir)
    write_json_atomic(out / SUMMARY_JSON, summary)
    write_json_atomic(out / FINDINGS_JSON, [f.to_dict() for f in findings])
    html = render_run_report(run, summary, findings, ctx)
    (out / REPORT_HTML).write_text(html, encoding="utf-8")
    stage("render")
    return out / REPORT_HTML


def render_run_report(run: RunData, summary: dict[str, Any], findings: list[Finding], ctx: DiagnosisContext) -> str:
    from servescope.report_templates.render import render_page

    return render_page("report.html.j2", **report_context(run, summary, findings, ctx))


def report_context(run: RunData, summary: dict[str, Any], findings: list[Finding], ctx: DiagnosisContext) -> dict[str, Any]:
    """Everything report.html.j2 reads (also what lab.html.j2 reuses per run)."""
    return {
        "run": run.run,
        "run_name": run.path.name if run.path else "run",
        "summary": summary,
        "findings": findings,
        "slices": all_slice_tables(ctx.frame, ctx.itl_by_group),
        "time_series": all_time_series(ctx.frame, ctx.metrics),
        "worst_ttft": worst_requests(ctx.frame, "ttft_s"),
        "worst_e2e": worst_requests(ctx.frame, "e2e_s"),
        "client": ctx.client,
        "metadata": run_metadata(run.run),
        "prompt_lengths_exact": prompt_lengths_exact(run.run),
        "target_label": target_label(run.run.get("target")),
        "server_metrics_present": not run.server_metrics.empty,
        "flows": flow_view(summary, ctx.frame),
        "pools": pool_view(ctx.frame, ctx.metrics),
    }


def worst_requests(frame: pd.DataFrame, column: str, rows: int = WORST_ROWS) -> list[dict[str, Any]]:
    values = frame[column].to_numpy(dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return []
    top = finite[np.argsort(-values[finite], kind="stable")[:rows]]
    picked = frame.iloc[top][[c for c in WORST_COLUMNS if c in frame]]
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()} for row in picked.to_dict("records")]


def target_label(target: Any) -> str:
    """One line naming what was driven: the URL, or the bundled engine with its flags."""
    if isinstance(target, dict):
        if target.get("kind") == "url" or "engine" not in target:
            return str(target.get("base_url", ""))
        return " ".join([str(target.get("engine"))] + [str(a) for a in target.get("engine_args", [])])
    return "" if target is None else str(target)


def prompt_lengths_exact(run: dict[str, Any]) -> bool | None:
    """Were prompt lengths exact for the target's tokenizer? (run.json, whichever spelling the writer used)"""
    for holder in (run, run.get("tokenizer") if isinstance(run.get("tokenizer"), dict) else {}, run.get("workload") if isinstance(run.get("workload"), dict) else {}):
        for key in ("prompt_lengths_exact", "exact_for_target", "exact"):
            if isinstance(holder.get(key), bool):
                return holder[key]
    return None


def run_metadata(run: dict[str, Any]) -> list[tuple[str, Any]]:
    """run.json as (key, value) rows, scalars first; big nested values are left to the JSON dump."""
    scalars = [(k, v) for k, v in run.items() if not isinstance(v, (dict, list))]
    nested = [(k, v) for k, v in run.items() if isinstance(v, (dict, list))]
    return scalars + nested


class _Stopwatch:
    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink, self.last = sink, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.sink is not None:
            self.sink[name] = now - self.last
        self.last = now
