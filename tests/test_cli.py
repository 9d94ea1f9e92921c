"""The command line's contract: exit statuses mapped once, and a CLI reference that matches --help."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from servescope.cli import COMMANDS, LazyGroup, help_markdown, main
from servescope.errors import EXIT_USAGE, ServescopeError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_the_current_help() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == help_markdown(), (
        "docs/cli.md is out of date; regenerate it with the command at its top")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"], prog_name="servescope")
    assert result.exit_code == 0, result.output
    assert "Usage: servescope" in result.output


def _group_with(command: click.Command) -> click.Group:
    group = LazyGroup(name="servescope")
    group.get_command = lambda ctx, name: command if name == command.name else None  # type: ignore[method-assign]
    group.list_commands = lambda ctx: [command.name]  # type: ignore[method-assign]
    return group


class _Custom(ServescopeError):
    exit_code = 7


@pytest.mark.parametrize(("error", "code"), [(UsageError("bad flag"), EXIT_USAGE), (_Custom("boom"), 7)])
def test_errors_become_their_types_exit_status(error: Exception, code: int) -> None:
    @click.command("x")
    def x() -> None:
        raise error

    result = CliRunner().invoke(_group_with(x), ["x"])
    assert result.exit_code == code
    assert f"Error: {error}" in result.output
    assert ("servescope x --help" in result.output) == isinstance(error, UsageError)


def test_a_command_returns_its_exit_status() -> None:
    @click.command("y")
    def y() -> int:
        return 1

    assert CliRunner().invoke(_group_with(y), ["y"]).exit_code == 1
