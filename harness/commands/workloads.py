"""`servescope workloads list | show NAME`: the bundled workload presets."""

from __future__ import annotations

import click

from servescope.workloads.errors import WorkloadError
from servescope.workloads.spec import list_presets, preset_path


@click.group("workloads", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def workloads(ctx: click.Context) -> None:
    """List or show the bundled workload presets (`servescope run --workload NAME` uses them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@workloads.command("list")
def list_cmd() -> None:
    """Name, description and request classes of every preset."""
    from rich.console import Console
    from rich.table import Table

    table = Table("preset", "description", "classes", box=None, header_style="bold")
    for info in list_presets():
        table.add_row(info.name, info.description, ", ".join(info.classes))
    Console(width=160).print(table)


@workloads.command("show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """Print a preset's YAML (copy it to start a workload file of your own)."""
    path = preset_path(name)
    if path is None:
        names = ", ".join(p.name for p in list_presets())
        raise click.UsageError(f"no preset named {name!r} (presets: {names})")
    click.echo(path.read_text(encoding="utf-8"), nl=False)


__all__ = ["workloads", "WorkloadError"]
