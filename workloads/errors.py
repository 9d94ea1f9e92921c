"""The one error type of the workloads package.

A bad workload file should be fixable from the message alone, so every error
names the file, the field path (`classes[1].prompt_tokens.dist`) and, where it
helps, the allowed values. A file with several mistakes raises one error that
lists every one of them (`problems`), each with its own field path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from servescope.errors import UsageError


class WorkloadError(UsageError):
    """A workload spec, dataset, trace or tokenizer that cannot be used, and why.

    `problems` holds the single errors this one stands for: `(self,)` for a
    single error, every problem found for a file checked as a whole.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        allowed: Iterable[object] | None = None,
        key: str | None = None,
        problems: Sequence[WorkloadError] = (),
    ) -> None:
        self.message = message
        self.source = source
        self.field = field
        self.allowed = tuple(allowed) if allowed is not None else None
        self.key = key  # set for an unknown key: `field` is then the key's own path
        self.problems: tuple[WorkloadError, ...] = tuple(problems) or (self,)
        super().__init__(self._render())

    @classmethod
    def unknown_key(cls, key: object, path: str, allowed: Sequence[str]) -> WorkloadError:
        """`unknown key 'distribution' at classes[0].prompt_tokens; allowed: dist, ...`."""
        field = f"{path}.{key}" if path else str(key)
        return cls(f"unknown key {key!r}", field=field, allowed=allowed, key=str(key))

    @classmethod
    def collect(cls, errors: Sequence[WorkloadError], *, source: str | None = None) -> WorkloadError:
        """One error standing for all of `errors` (the error itself when there is one)."""
        flat = [p for err in errors for p in err.problems]
        if source is not None:
            flat = [p.within(source=source) for p in flat]
        if len(flat) == 1:
            return flat[0]
        lines = "\n".join(f"  - {p._render(with_source=False)}" for p in flat)
        first = flat[0]
        return cls(f"{len(flat)} problems:\n{lines}", source=first.source, field=first.field, problems=flat)

    def _line(self) -> str:
        if self.key is not None:
            parent = self.field[: -len(self.key) - 1] if self.field and self.field != self.key else ""
            text = f"unknown key {self.key!r} at {parent or 'the top level'}"
            hint = suggest(self.key, self.allowed or ())
            if self.allowed:
                text += f"; allowed: {', '.join(str(a) for a in self.allowed)}"
            return text + (f" (did you mean {hint!r}?)" if hint else "")
        text = f"{self.field}: {self.message}" if self.field else self.message
        if self.allowed:
            text += f"; allowed: {', '.join(str(a) for a in self.allowed)}"
        return text

    def _render(self, with_source: bool = True) -> str:
        if len(self.problems) > 1 or self.problems[0] is not self:
            return f"{self.source}: {self.message}" if with_source and self.source else self.message
        line = self._line()
        return f"{self.source}: {line}" if with_source and self.source else line

    def within(self, *, source: str | None = None, prefix: str | None = None) -> WorkloadError:
        """The same error (every problem of it), placed inside a file and/or under a parent field path."""
        if len(self.problems) > 1:
            return WorkloadError.collect([p.within(source=source, prefix=prefix) for p in self.problems])
        field = self.field
        if prefix:
            field = f"{prefix}.{field}" if field and not field.startswith("[") else f"{prefix}{field or ''}"
        return WorkloadError(self.message, source=self.source or source, field=field, allowed=self.allowed,
                             key=self.key)


def suggest(word: str, choices: Iterable[object]) -> str | None:
    """The allowed name a mistyped `word` most likely meant (`distribution` -> `dist`), if any."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    lowered = word.lower()
    starts = [n for n in names if len(n) >= 3 and (lowered.startswith(n.lower()) or n.lower().startswith(lowered))]
    return starts[0] if starts else None
