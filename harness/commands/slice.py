"""`servescope slice LOGFILE|DIR`: slice and diagnose requests without sending any load.

Given a production log (JSONL or CSV), it imports the rows into a run
directory (`harness.orchestration.log_import`) and builds the usual diagnosis report.
Given a run directory, it (re)builds that directory's report. Either way it
prints the slices where latency differs most, the on-call first look.
"""

from __future__ import annotations

from pathlib import Path

import click

from servescope.units import format_duration


@click.command("slice", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Run directory to write for an imported log (default: LOGFILE's name + '-run', beside it).")
@click.option("--map", "pairs", multiple=True, metavar="FIELD=COLUMN[:UNIT]",
              help="Log column holding a field, e.g. --map ttft=time_to_first_token_ms --map e2e=latency:ms (repeatable).")
@click.option("--mapping", "mapping_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file: `columns: {ttft: first_token_ms, ...}`, optional `units:` and `time_unit:`.")
@click.option("--time-unit", type=click.Choice(["us", "ms", "s"]),
              help="Unit of duration columns whose name has no _ms/_s suffix (default s).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "tsv"]), help="Log format when the extension does not say.")
@click.option("--slo", default=None, help="Judge an imported log against SLOs (recorded in its run.json), e.g. ttft_p99=500ms,e2e_p99=5s.")
@click.option("--no-report", is_flag=True, help="Only import (or only print slices): skip report.html.")
def slice_cmd(source: Path, out_dir: Path | None, pairs: tuple[str, ...], mapping_file: Path | None,
              time_unit: str | None, fmt: str | None, slo: str | None, no_report: bool) -> None:
    """Slice and diagnose the requests of LOGFILE (JSONL/CSV) or of a run directory DIR."""
    from servescope.harness.orchestration.log_import import ColumnMapping, import_log
    from servescope.slo import parse_slos

    if source.is_dir():
        if pairs or mapping_file or fmt or time_unit or slo:
            raise click.UsageError("--map/--mapping/--format/--time-unit/--slo apply to log files, not to a run directory")
        run_dir = source
    else:
        run_dir = out_dir or source.with_name(source.name.split(".")[0] + "-run")
        parse_slos(slo)  # fail before writing anything
        mapping = ColumnMapping.parse(pairs, mapping_file, time_unit)
        import_log(source, run_dir, mapping, fmt, slo=slo)
        click.echo(f"imported {source} -> {run_dir}")
        click.echo("columns read: " + _columns_line(run_dir))
    print_slices(run_dir)
    if not no_report:
        from servescope.analyzers.report import build_report

        click.echo(f"wrote {build_report(run_dir)}")


def print_slices(run_dir: Path, top: int = 12) -> None:
    """The slices whose TTFT or E2E p99 stands out most from the whole, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    from servescope.analyzers.context import build_context
    from servescope.analyzers.slices import all_slice_tables
    from servescope.rundir.reader import load_run

    ctx = build_context(load_run(run_dir))
    overall_ok = ctx.ok
    base = {m: overall_ok[m].quantile(0.99) if len(overall_ok) else float("nan") for m in ("ttft_s", "e2e_s")}
    rows = []
    for table in all_slice_tables(ctx.frame):
        for row in table["rows"]:
            ratios = [row[m]["p99"] / base[m] for m in base if row[m]["p99"] is not None and base[m] and base[m] == base[m]]
            rows.append((max(ratios, default=0.0), table["title"], row))
    rows.sort(key=lambda r: -r[0])
    out = Table(title=f"{len(ctx.frame)} requests: slices by how far their p99 stands above the whole run")
    for col in ("slice", "value", "n", "errors", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "p99 / all"):
        out.add_column(col, justify="left" if col in ("slice", "value") else "right")
    for ratio, title, row in rows[:top]:
        out.add_row(title, row["value"] + (" (few)" if row["low_n"] else ""), str(row["n"]), str(row["errors"]),
                    _ms(row["ttft_s"]["p50"]), _ms(row["ttft_s"]["p99"]), _ms(row["e2e_s"]["p50"]),
                    _ms(row["e2e_s"]["p99"]), f"{ratio:.2f}x" if ratio else "–")
    Console(width=max(110, Console().width)).print(out)


def _columns_line(run_dir: Path) -> str:
    """`field <- column (unit)` for each field run.json's `source.columns` says was read."""
    import json

    from servescope.rundir.schema import RUN_JSON

    columns = (json.loads((run_dir / RUN_JSON).read_text()).get("source") or {}).get("columns") or {}
    return ", ".join(f"{name} <- {c['column']}" + (f" ({c['unit']})" if c.get("unit") else "")
                     for name, c in columns.items())


def _ms(value: float | None) -> str:
    return format_duration(value, digits=0)
