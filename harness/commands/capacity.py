"""`servescope capacity`: the highest request rate that still meets the SLO.

Exit status: 0 a rate met the SLO (and reached `--require` when given),
1 none did (or the capacity fell short of `--require`), 2 bad usage.
The search is `harness.orchestration.capacity.run_capacity`; this module maps flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from servescope.errors import EXIT_FAILED, EXIT_OK, UsageError
from servescope.harness.commands.options import CLIENT, TARGET, WORKLOAD, picked, with_options


@click.command("capacity", context_settings={"help_option_names": ["-h", "--help"]})
@with_options(TARGET)
@click.option("--slo", required=True, help="Objectives every step must meet, e.g. ttft_p99=500ms,tpot_p99=50ms,error_rate=1%.")
@with_options(WORKLOAD)
@click.option("--start-rate", type=float, default=1.0, show_default=True, help="First rate tried (req/s).")
@click.option("--max-rate", type=float, default=256.0, show_default=True, help="Never try above this rate (req/s).")
@click.option("--step-duration", default="20s", show_default=True, help="Length of each full step.")
@click.option("--tolerance", type=float, default=0.1, show_default=True, help="Stop bisecting when fail/pass rates are within this fraction.")
@click.option("--max-steps", type=int, default=12, show_default=True, help="Most runs the search may do.")
@click.option("--max-error-rate", type=float, default=0.01, show_default=True, help="A step with more errors than this fraction fails.")
@click.option("--require", "required_rate", type=float, help="Exit 1 unless the capacity reaches this rate (req/s): a pre-launch gate.")
@with_options(CLIENT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the steps' run directories, capacity.json and capacity.html (default runs/capacity-<time>).")
def capacity(**o: Any) -> int:
    """Find the highest request rate that meets the SLO (grow the rate, then bisect)."""
    from servescope.analyzers.capacity import CapacitySettings
    from servescope.harness.config import RunConfig, parse_duration
    from servescope.harness.orchestration.capacity import run_capacity

    out = o["out"] or _default_out()
    if (out / "capacity.json").exists():
        raise UsageError(f"{out} already holds a capacity search; choose another --out")
    settings = CapacitySettings(
        slo=str(o["slo"]), start_rate=float(o["start_rate"]), max_rate=float(o["max_rate"]),
        step_duration_s=parse_duration(str(o["step_duration"]), "step-duration"), tolerance=float(o["tolerance"]),
        max_steps=int(o["max_steps"]), max_error_rate=float(o["max_error_rate"]),
    )
    base = RunConfig(**picked(o, TARGET, WORKLOAD, CLIENT), rate=settings.start_rate, slo=settings.slo,
                     report=False, command_line=tuple(sys.argv), show_progress=False)

    def show(step) -> None:
        verdict = "pass" if step.passed else ("FAIL (probe)" if step.early_stop else "FAIL")
        click.echo(f"  rate {step.rate:8.3g} req/s  {step.duration_s:5.1f}s  served {step.req_per_s or 0:7.2f} req/s  "
                   f"goodput {step.goodput_req_per_s or 0:7.2f}  {verdict}: {step.reason}")

    click.echo(f"capacity search: SLO {settings.slo}, steps of {settings.step_duration_s:g}s, out {out}")
    result = run_capacity(base, settings, out, on_step=show)
    click.echo(result.stop_reason)
    click.echo(f"wrote {out / 'capacity.html'} and {out / 'capacity.json'}")
    if result.capacity_rate is None:
        click.echo("no rate met the SLO", err=True)
        return EXIT_FAILED
    click.echo(f"capacity: {result.capacity_rate:.3g} req/s")
    if o["required_rate"] is not None and result.capacity_rate < float(o["required_rate"]):
        click.echo(f"capacity {result.capacity_rate:.3g} req/s is below --require {o['required_rate']:g} req/s", err=True)
        return EXIT_FAILED
    return EXIT_OK


def _default_out() -> Path:
    from datetime import datetime

    return Path("runs") / datetime.now().strftime("capacity-%Y%m%d-%H%M%S")
