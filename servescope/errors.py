"""servescope's exit statuses, and the error types that carry them.

Every error a user can cause derives from `UsageError` (exit 2): the message
says what was wrong and how to fix it. The CLI maps an error to its exit
status in one place (`servescope.cli`), through the `exit_code` attribute of
its type, the way click's own `UsageError` does.
"""

from __future__ import annotations

EXIT_OK = 0  # done, and every SLO met
EXIT_FAILED = 1  # an SLO or regression gate failed, or the run failed
EXIT_USAGE = 2  # bad usage or input
EXIT_INTERRUPTED = 130  # Ctrl-C: what was measured is kept and reported


class ServescopeError(Exception):
    """Base of servescope's own errors."""

    exit_code = EXIT_FAILED


class UsageError(ServescopeError, ValueError):
    """Bad usage or input (a flag, a file, a directory); the message says how to fix it."""

    exit_code = EXIT_USAGE
