"""`servescope lab NAME [--out DIR]`: run a scripted experiment and its control on the reference engine.

Thin: the work is `harness.orchestration.lab.run_lab`. Exit 0 when the expected finding
fired for the experiment and not for the control, 1 when it did not, 2 for an
unknown lab or a run that could not start.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from servescope.harness.orchestration.lab import LABS


def _lab_list() -> str:
    return "\n".join(f"{name:<13} {lab.experiment_label} vs {lab.control_label}" for name, lab in LABS.items())


@click.command("lab", context_settings={"help_option_names": ["-h", "--help"]}, epilog="\b\nLabs (experiment vs control):\n" + _lab_list())
@click.argument("name", type=click.Choice(tuple(LABS)))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: runs/lab-NAME-TIMESTAMP).")
@click.option("--scale", type=click.FloatRange(min=0.1, max=20), default=1.0, show_default=True,
              help="Multiply each run's duration (longer runs give steadier numbers).")
@click.option("--ray", "ray", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run each side's load-generator workers as Ray actors (see `servescope run --ray`).")
def lab(name: str, out: Path | None, scale: float, ray: str | None) -> int:
    """Run lab NAME: an experiment with the cause switched on and a control without it."""
    from servescope.errors import EXIT_FAILED, EXIT_OK
    from servescope.harness.orchestration.lab import run_lab

    out = out or Path("runs") / f"lab-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    lab_def = LABS[name]
    click.echo(f"lab {name}: {lab_def.question}")
    click.echo(f"  experiment: {lab_def.experiment_label}; control: {lab_def.control_label}")
    result = run_lab(name, out, duration_scale=scale, show_progress=False, ray=ray,
                     on_side=lambda side, label: click.echo(f"  running {side} ({label}) …"))
    for side in (result.experiment, result.control):
        rules = ", ".join(f"{f.rule} ({f.severity})" for f in side.findings) or "none"
        click.echo(f"  {side.run_dir.name:<10} findings: {rules}")
    verdict = "as expected" if result.ok else "NOT as expected"
    click.echo(f"{lab_def.rule}: fired in experiment={result.fired_in_experiment}, "
               f"silent in control={result.silent_in_control} -> {verdict}")
    click.echo(f"report: {result.report}")
    return EXIT_OK if result.ok else EXIT_FAILED
