"""`servescope report DIR [--slo ...]`: (re)build summary.json, findings.json and report.html.

Thin by design: the work is `analyzers.report.build_report`. Exit 0 when the
report was written (and, with SLOs, they were met), 1 when an SLO failed,
2 when DIR is not a run directory or --slo cannot be read.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--slo", default=None, metavar="LIST",
              help="Objectives to judge, e.g. ttft_p99=500ms,tpot_p99=50ms,e2e_p99=2s,error_rate=0.1% "
                   "(default: the run's own --slo from run.json).")
def report(run_dir: Path, slo: str | None) -> int:
    """(Re)build RUN_DIR/summary.json, findings.json and report.html from the recorded requests."""
    import json

    from servescope.analyzers.report import build_report
    from servescope.errors import EXIT_FAILED, EXIT_OK
    from servescope.slo import parse_slos

    slos = parse_slos(slo) if slo is not None else None
    path = build_report(run_dir, slos)
    summary = json.loads((path.parent / "summary.json").read_text())
    findings = json.loads((path.parent / "findings.json").read_text())
    overall = summary["overall"]
    click.echo(f"{overall['requests']} requests ({overall['ok']} ok), {len(findings)} finding(s)"
               + (": " + ", ".join(f"{f['rule']} ({f['severity']})" for f in findings) if findings else ""))
    slo_result = summary.get("slo") or {}
    if slo_result.get("objectives"):
        failed = [o["name"] for o in slo_result["objectives"] if not o["ok"]]
        click.echo("SLO: " + ("met" if not failed else "FAILED (" + ", ".join(failed) + ")"))
    click.echo(f"report: {path}")
    return EXIT_FAILED if slo_result.get("objectives") and not slo_result.get("ok", True) else EXIT_OK
