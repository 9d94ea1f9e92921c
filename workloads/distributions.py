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

from servescope.workloads.errors import WorkloadError, suggest

KINDS = ("fixed", "uniform", "normal", "lognormal", "empirical")
# The keys each kind takes, in the order messages list them.
_PARAMS = {
    "fixed": ("dist", "value", "min", "max"),
    "uniform": ("dist", "min", "max"),
    "normal": ("dist", "mean", "std", "min", "max"),
    "lognormal": ("dist", "mean", "median", "sigma", "min", "max"),
    "empirical": ("dist", "table", "min", "max"),
}
ALL_PARAMS = ("dist", "value", "min", "max", "mean", "std", "median", "sigma", "table")


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
        problems = _problems(self.kind, {name: getattr(self, name) for name in _FIELDS})
        if problems:
            raise WorkloadError.collect(problems)
        if self.kind == "empirical":
            object.__setattr__(self, "_cum_weights", tuple(itertools.accumulate(w for _, w in self.table)))

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


_FIELDS = ("value", "mean", "std", "median", "sigma", "table", "min", "max")
_NEEDS = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std"), "lognormal": ("sigma",),
          "empirical": ("table",)}


def _problems(kind: str, params: dict[str, Any]) -> list[WorkloadError]:
    """Everything wrong with a distribution's parameters (fields relative to the distribution)."""
    if kind not in KINDS:
        return [WorkloadError(f"unknown distribution {kind!r}", field="dist", allowed=KINDS)]
    get = params.get
    out = [WorkloadError(f"a {kind} distribution needs `{name}`", field=name)
           for name in _NEEDS[kind] if get(name) in (None, ())]
    for name in ("value", "mean", "std", "median", "sigma", "min", "max"):
        v = get(name)
        if v is not None and (not math.isfinite(v) or v < 0):
            out.append(WorkloadError(f"must be a finite number >= 0, got {v:g}", field=name))
    if get("min") is not None and get("max") is not None and get("min") > get("max"):
        out.append(WorkloadError(f"min ({get('min'):g}) is above max ({get('max'):g})", field="min"))
    if kind == "lognormal":
        if (get("mean") is None) == (get("median") is None):
            out.append(WorkloadError("a lognormal distribution needs exactly one of `mean` or `median`", field="mean"))
        elif (get("mean") or get("median")) == 0:
            out.append(WorkloadError("a lognormal mean/median must be > 0", field="mean"))
    table = get("table") or ()
    if kind == "empirical" and table:
        weights = [w for _, w in table]
        if any(w < 0 for w in weights) or sum(weights) <= 0 or any(v < 0 for v, _ in table):
            out.append(WorkloadError("empirical table needs values >= 0 and weights >= 0 with a positive sum",
                                     field="table"))
    return out


def parse_distribution(raw: Any, path: str) -> Distribution:
    """Build a Distribution from its YAML form; every problem found is raised at once, each naming its path."""
    if isinstance(raw, bool):
        raise WorkloadError(f"expected a number or a mapping with `dist`, got {raw!r}", field=path)
    if isinstance(raw, (int, float)):
        raw = {"dist": "fixed", "value": raw}
    if not isinstance(raw, dict):
        raise WorkloadError(f"expected a number or a mapping with `dist`, got {type(raw).__name__}", field=path)
    problems: list[WorkloadError] = []
    kind = raw.get("dist")
    allowed = _PARAMS.get(kind, ALL_PARAMS) if isinstance(kind, str) else ALL_PARAMS
    unknown = [k for k in raw if k not in allowed]
    problems += [WorkloadError.unknown_key(k, path, allowed) for k in unknown]
    if kind is None:
        if not any(suggest(str(k), ("dist",)) for k in unknown):  # a misspelt `dist` is reported once, above
            problems.append(WorkloadError("missing `dist` (the distribution kind)", field=f"{path}.dist", allowed=KINDS))
    elif kind not in KINDS:
        problems.append(WorkloadError(f"unknown distribution kind {kind!r}", field=f"{path}.dist", allowed=KINDS))
    kwargs: dict[str, Any] = {"kind": kind}
    unusable = set(unknown)  # keys already reported: not reported again as missing
    for key, value in raw.items():
        if key == "dist" or key in unknown:
            continue
        if key == "table":
            try:
                kwargs["table"] = _parse_table(value, f"{path}.table")
            except WorkloadError as err:
                problems.append(err)
                unusable.add(key)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(WorkloadError(f"expected a number, got {value!r}", field=f"{path}.{key}"))
            unusable.add(key)
        else:
            kwargs[key] = float(value)
    if kind in KINDS:
        problems += [p.within(prefix=path) for p in _problems(kind, kwargs) if p.field not in unusable]
    if problems:
        raise WorkloadError.collect(problems)
    return Distribution(**kwargs)


def _parse_table(value: Any, path: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list) or not value:
        raise WorkloadError("expected a non-empty list of [value, weight] pairs", field=path)
    rows, problems = [], []
    for i, row in enumerate(value):
        if (
            not isinstance(row, (list, tuple)) or len(row) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        ):
            problems.append(WorkloadError(f"expected [value, weight], got {row!r}", field=f"{path}[{i}]"))
        else:
            rows.append((float(row[0]), float(row[1])))
    if problems:
        raise WorkloadError.collect(problems)
    return tuple(rows)
