"""Length and think-time distributions of a workload class.

Written in YAML either as a plain number (a fixed value) or as a mapping with a
`dist` kind and its parameters, plus optional `min` / `max` clamps:

    prompt_tokens: 512
    prompt_tokens: {dist: uniform, min: 32, max: 512}
    prompt_tokens: {dist: normal, mean: 1000, std: 200, min: 64}
    prompt_tokens: {dist: lognormal, mean: 800, sigma: 0.7, max: 8192}   # or median: instead of mean:
    output_tokens: {dist: empirical, table: [[64, 5], [256, 3], [1024, 1]]}

`sigma` is the standard deviation of log(x); with `mean` the distribution's
arithmetic mean is `mean` (mu = ln(mean) - sigma^2 / 2).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from workloads.errors import WorkloadError

KINDS = ("fixed", "uniform", "normal", "lognormal", "empirical")
_PARAMS = {
    "fixed": {"dist", "value", "min", "max"},
    "uniform": {"dist", "min", "max"},
    "normal": {"dist", "mean", "std", "min", "max"},
    "lognormal": {"dist", "mean", "median", "sigma", "min", "max"},
    "empirical": {"dist", "table", "min", "max"},
}


@dataclass(frozen=True)
class Distribution:
    """A seeded-sampleable distribution of non-negative numbers, clamped to [min, max]."""

    kind: str
    value: float | None = None  # fixed
    mean: float | None = None  # normal, lognormal
    std: float | None = None  # normal
    median: float | None = None  # lognormal (alternative to mean)
    sigma: float | None = None  # lognormal: std of log(x)
    table: tuple[tuple[float, float], ...] = ()  # empirical: (value, weight)
    min: float | None = None
    max: float | None = None
    _cum_weights: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkloadError(f"unknown distribution {self.kind!r}", field="dist", allowed=KINDS)
        need = {
            "fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std"),
            "lognormal": ("sigma",), "empirical": ("table",),
        }[self.kind]
        for name in need:
            if getattr(self, name) in (None, ()):
                raise WorkloadError(f"a {self.kind} distribution needs `{name}`", field=name)
        for name in ("value", "mean", "std", "median", "sigma", "min", "max"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise WorkloadError(f"must be a finite number >= 0, got {v}", field=name)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise WorkloadError(f"min ({self.min}) is above max ({self.max})", field="min")
        if self.kind == "lognormal":
            if (self.mean is None) == (self.median is None):
                raise WorkloadError("a lognormal distribution needs exactly one of `mean` or `median`", field="mean")
            if (self.mean or self.median) == 0:
                raise WorkloadError("a lognormal mean/median must be > 0", field="mean")
        if self.kind == "empirical":
            weights = [w for _, w in self.table]
            if any(w < 0 for w in weights) or sum(weights) <= 0 or any(v < 0 for v, _ in self.table):
                raise WorkloadError("empirical table needs values >= 0 and weights >= 0 with a positive sum", field="table")
            object.__setattr__(self, "_cum_weights", tuple(itertools.accumulate(weights)))

    def sample(self, rng: random.Random) -> float:
        kind = self.kind
        if kind == "fixed":
            x = float(self.value)
        elif kind == "uniform":
            x = rng.uniform(self.min, self.max)
        elif kind == "normal":
            x = rng.gauss(self.mean, self.std)
        elif kind == "lognormal":
            mu = math.log(self.median) if self.median is not None else math.log(self.mean) - self.sigma**2 / 2
            x = rng.lognormvariate(mu, self.sigma)
        else:
            i = bisect.bisect_right(self._cum_weights, rng.random() * self._cum_weights[-1])
            x = self.table[min(i, len(self.table) - 1)][0]
        if self.min is not None:
            x = max(x, self.min)
        if self.max is not None:
            x = min(x, self.max)
        return max(x, 0.0)

    def sample_int(self, rng: random.Random, lowest: int = 1) -> int:
        """An integer sample (token counts, turns), never below `lowest`."""
        return max(lowest, int(round(self.sample(rng))))

    @property
    def upper_bound(self) -> float:
        """The largest value this distribution can produce (inf when unbounded)."""
        if self.max is not None:
            return self.max
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "empirical":
            return max(v for v, _ in self.table)
        return math.inf


def parse_distribution(raw: Any, path: str) -> Distribution:
    """Build a Distribution from its YAML form; errors name `path`."""
    if isinstance(raw, bool):
        raise WorkloadError(f"expected a number or a mapping with `dist`, got {raw!r}", field=path)
    if isinstance(raw, (int, float)):
        raw = {"dist": "fixed", "value": raw}
    if not isinstance(raw, dict):
        raise WorkloadError(f"expected a number or a mapping with `dist`, got {type(raw).__name__}", field=path)
    kind = raw.get("dist")
    if kind not in KINDS:
        raise WorkloadError(f"unknown or missing distribution kind {kind!r}", field=f"{path}.dist", allowed=KINDS)
    unknown = set(raw) - _PARAMS[kind]
    if unknown:
        raise WorkloadError(
            f"unknown key(s) {sorted(unknown)} for a {kind} distribution", field=path, allowed=sorted(_PARAMS[kind])
        )
    kwargs: dict[str, Any] = {"kind": kind}
    for key, value in raw.items():
        if key == "dist":
            continue
        if key == "table":
            kwargs["table"] = _parse_table(value, f"{path}.table")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkloadError(f"expected a number, got {value!r}", field=f"{path}.{key}")
        else:
            kwargs[key] = float(value)
    try:
        return Distribution(**kwargs)
    except WorkloadError as err:
        raise err.within(prefix=path) from None


def _parse_table(value: Any, path: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list) or not value:
        raise WorkloadError("expected a non-empty list of [value, weight] pairs", field=path)
    rows = []
    for i, row in enumerate(value):
        if (
            not isinstance(row, (list, tuple)) or len(row) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        ):
            raise WorkloadError(f"expected [value, weight], got {row!r}", field=f"{path}[{i}]")
        rows.append((float(row[0]), float(row[1])))
    return tuple(rows)
