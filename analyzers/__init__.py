"""Analyzers: metric computation, slicing, diagnosis rules, comparison and capacity evaluation over run directories.

The public entry points (docs/internals.md):

* `load_run(run_dir) -> RunData` reads a run directory;
* `summarize(run, slos=None) -> dict` is summary.json;
* `parse_slos(text) -> list[SLO]` parses `ttft_p99=500ms,error_rate=0.1%`;
* `diagnose(run) -> list[Finding]` runs the diagnosis rules;
* `analyzers.report.build_report(run_dir, slos=None) -> Path` writes summary.json,
  findings.json and report.html.
"""

from analyzers.findings import Finding
from analyzers.rules import diagnose
from analyzers.rundata import RunData, RunDirError, load_run
from analyzers.slo import SLO, SLOError, parse_slos
from analyzers.summary import summarize

__all__ = [
    "SLO", "Finding", "RunData", "RunDirError", "SLOError",
    "diagnose", "load_run", "parse_slos", "summarize",
]
