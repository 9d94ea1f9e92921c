"""The one error type of the workloads package.

A bad workload file should be fixable from the message alone, so every error
names the file, the field path (`classes[1].prompt_tokens.dist`) and, where it
helps, the allowed values.
"""

from __future__ import annotations

from collections.abc import Iterable

from servescope.errors import UsageError


class WorkloadError(UsageError):
    """A workload spec, dataset or trace that cannot be used, and why."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        allowed: Iterable[object] | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.field = field
        self.allowed = tuple(allowed) if allowed is not None else None
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        text = f"{where}: {self.message}" if where else self.message
        if self.allowed:
            text += f" (allowed: {', '.join(str(a) for a in self.allowed)})"
        return text

    def within(self, *, source: str | None = None, prefix: str | None = None) -> "WorkloadError":
        """The same error, placed inside a file and/or under a parent field path."""
        field = self.field
        if prefix:
            field = f"{prefix}.{field}" if field and not field.startswith("[") else f"{prefix}{field or ''}"
        return WorkloadError(self.message, source=self.source or source, field=field, allowed=self.allowed)
