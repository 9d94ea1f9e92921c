"""`servescope workloads list | show NAME`: the bundled workload presets and example user scripts."""

from __future__ import annotations

import click

from servescope.workloads.errors import WorkloadError
from servescope.workloads.spec import list_presets, preset_path


@click.group("workloads", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def workloads(ctx: click.Context) -> None:
    """List or show the bundled workload presets (`run --workload NAME`) and user scripts (`run --users NAME`)."""
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
    console = Console(width=160)
    console.print(table)
    scripts = Table("user script", "description", "users (weight: tasks)", box=None, header_style="bold")
    for name, script in _scripts().items():
        users = "; ".join(f"{c.name} ({c.weight:g}: {', '.join(c.tasks)})" for c in script.describe())
        scripts.add_row(name, _first_line(script.module.__doc__), users)
    console.print()
    console.print(scripts)


@workloads.command("show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """Print a preset's YAML or a user script's source (copy it to start one of your own)."""
    from servescope.harness.users.script import bundled_scripts

    path = preset_path(name) or bundled_scripts().get(name)
    if path is None:
        names = ", ".join(p.name for p in list_presets())
        raise click.UsageError(f"no preset or user script named {name!r} (presets: {names}; "
                               f"user scripts: {', '.join(bundled_scripts())})")
    click.echo(path.read_text(encoding="utf-8"), nl=False)


def _scripts() -> dict:
    from servescope.harness.users.script import bundled_scripts, load_script

    return {name: load_script(path) for name, path in bundled_scripts().items()}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


__all__ = ["workloads", "WorkloadError"]
