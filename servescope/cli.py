"""The `servescope` command line.

Commands are loaded lazily: `servescope run` must not pay for importing the
analyzers, and `servescope serve` is the only command that imports torch. Each
command lives in its own module (see COMMANDS) and stays thin: it parses
options, calls a library function that tests can call directly, and returns
its exit status. Errors become exit statuses here and nowhere else: a
`ServescopeError` is printed as `Error: ...` and exits with its type's
`exit_code` (2 for every `UsageError`).
"""

from __future__ import annotations

import importlib

import click

from servescope.errors import ServescopeError, UsageError
from servescope.version import __version__

# command name -> ("module:attribute" of its click command, one-line help).
# The help is kept here so `servescope --help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("servescope.harness.commands.run:run", "Drive a target (or the bundled engine) with a workload and measure every request."),
    "report": ("servescope.harness.commands.report:report", "(Re)build summary.json, findings.json and report.html of a run directory."),
    "compare": ("servescope.harness.commands.compare:compare", "Compare two runs; exit 1 on a significant regression."),
    "capacity": ("servescope.harness.commands.capacity:capacity", "Find the highest request rate that meets the SLO."),
    "slice": ("servescope.harness.commands.slice:slice_cmd", "Slice and diagnose recorded or imported requests (no load sent)."),
    "serve": ("servescope.reference_engine.cli:serve", "Start the bundled reference engine (OpenAI-compatible server)."),
    "workloads": ("servescope.harness.commands.workloads:workloads", "List or show the bundled workload presets."),
    "lab": ("servescope.harness.commands.lab:lab", "Run a scripted experiment and its control on the reference engine."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def invoke(self, ctx: click.Context) -> None:
        try:
            code = super().invoke(ctx)
        except ServescopeError as exc:
            click.echo(f"Error: {exc}", err=True)
            if isinstance(exc, UsageError) and ctx.invoked_subcommand:
                click.echo(f"Try 'servescope {ctx.invoked_subcommand} --help' for the options.", err=True)
            ctx.exit(exc.exit_code)
        if isinstance(code, int):
            ctx.exit(code)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def help_markdown() -> str:
    """docs/cli.md: every command's --help, as `servescope CMD --help` prints it (100 columns)."""
    parts = ["# servescope command line", "",
             "Every command's `--help`. Regenerate after changing an option:", "",
             "```bash", 'python -c "from servescope.cli import help_markdown; print(help_markdown(), end=\'\')" > docs/cli.md',
             "```", ""]
    # Each command's context is made as `servescope CMD --help` makes it: under main's, whose
    # settings (the help option names) it inherits.
    with main.make_context("servescope", [], resilient_parsing=True, terminal_width=100,
                           max_content_width=100) as root:
        for name in [None, *sorted(COMMANDS)]:
            if name is None:
                command, info_name, ctx = main, "servescope", root
            else:
                command, info_name = main.get_command(root, name), name
                ctx = command.make_context(info_name, [], parent=root, resilient_parsing=True)
            text = command.get_help(ctx)
            title = "servescope" if name is None else f"servescope {name}"
            parts += [f"## `{title}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servescope")
def main() -> None:
    """servescope: load-test and diagnose LLM serving endpoints."""


if __name__ == "__main__":
    main()
