"""`servescope compare BASE CAND`: the CI regression gate.

Exit status: 0 no gated metric regressed, 1 a gated metric regressed
significantly, 2 the inputs cannot be compared (what differs is printed).
The work is `analyzers.compare.compare_runs`; this module only parses flags,
prints the verdict and writes the requested outputs.
"""

from __future__ import annotations

from pathlib import Path

import click

_PERCENT_HELP = "a fraction or a percentage: 0.05 or 5%"


def parse_fraction(text: str, flag: str) -> float:
    """`5%` -> 0.05, `0.05` -> 0.05; anything else is a usage error naming the flag."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not {_PERCENT_HELP}", param_hint=flag) from None
    return value


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("cand", type=click.Path(path_type=Path))
@click.option("--threshold", default="5%", show_default=True,
              help="Smallest relative change that counts as a regression or improvement (" + _PERCENT_HELP + ").")
@click.option("--alpha", default=0.05, show_default=True, type=float, help="Significance level of each test.")
@click.option("--error-margin", default="1%", show_default=True,
              help="Smallest absolute error-rate change that counts (percentage points).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC",
              help="Metric whose regression fails the job (repeatable or comma-separated; default "
                   "ttft_p99,tpot_p99,e2e_p99,throughput). Names: ttft_p50..p99/mean/dist, tpot_*, itl_*, e2e_*, "
                   "req_per_s, output_tok_per_s (throughput), error_rate.")
@click.option("--out", "html_out", type=click.Path(path_type=Path), help="HTML report (default CAND/compare.html).")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), help="Markdown summary, e.g. $GITHUB_STEP_SUMMARY.")
@click.option("--junit", "junit_out", type=click.Path(path_type=Path), help="JUnit XML: one test case per gated metric.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="The whole comparison as JSON.")
@click.option("--bootstrap", "n_boot", default=2000, show_default=True, type=int, help="Bootstrap replicates.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap (same inputs, same numbers).")
def compare(base: Path, cand: Path, threshold: str, alpha: float, error_margin: str, gates: tuple[str, ...],
            html_out: Path | None, md_out: Path | None, junit_out: Path | None, json_out: Path | None,
            n_boot: int, seed: int) -> int:
    """Compare run BASE with run CAND (each a run directory or a folder of repeated runs).

    Exit 1 when a gated metric regressed significantly, 2 when the runs cannot be compared.
    """
    from servescope.analyzers.compare import DEFAULT_GATES, CompareSettings, compare_runs
    from servescope.analyzers.regression_report import headline, write_outputs

    gate_list = tuple(g.strip() for item in gates for g in item.split(",") if g.strip()) or DEFAULT_GATES
    try:
        settings = CompareSettings(
            threshold=parse_fraction(threshold, "--threshold"), alpha=alpha,
            error_margin=parse_fraction(error_margin, "--error-margin"), gates=gate_list, n_boot=n_boot, seed=seed,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = compare_runs(base, cand, settings)
    html_path = html_out if html_out is not None else _default_html(cand)
    written = write_outputs(result, html=html_path, markdown=md_out, junit=junit_out, json_path=json_out)
    _print_table(result)
    click.echo(headline(result))
    for path in written:
        click.echo(f"wrote {path}")
    return result.exit_code


def _default_html(cand: Path) -> Path:
    return cand / "compare.html"


def _print_table(result) -> None:
    """The gated and moved metrics as a rich table (every metric is in the HTML report)."""
    from rich.console import Console
    from rich.table import Table

    from servescope.analyzers.compare import VERDICT_IMPROVED, VERDICT_REGRESSED
    from servescope.analyzers.regression_report import format_change, format_p, format_value

    table = Table(title="servescope compare", show_lines=False)
    for col in ("metric", "baseline", "candidate", "change [CI]", "p", "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    styles = {VERDICT_REGRESSED: "bold red", VERDICT_IMPROVED: "green"}
    for m in result.overall:
        if not (m.gated or m.verdict in styles):
            continue
        table.add_row(m.label + (" [gate]" if m.gated else ""), format_value(m.base, m.unit),
                      format_value(m.cand, m.unit), format_change(m), format_p(m.p_value),
                      f"[{styles.get(m.verdict, '')}]{m.verdict}[/]" if m.verdict in styles else m.verdict)
    Console(width=max(100, Console().width)).print(table)
