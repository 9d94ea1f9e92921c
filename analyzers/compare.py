"""Comparing two builds: per metric and per slice, did the candidate get better or worse?

Each side is a run directory or a folder of repeated runs (subfolders with a
run.json, as `servescope run --repeat N` writes). Each metric's change comes
with a confidence interval from a hierarchical bootstrap (analyzers.stats) and,
for whole distributions, a Mann-Whitney U test. A verdict says `regressed` or
`improved` only when the change is statistically significant at `alpha` AND at
least `threshold` in size: significance alone would flag 0.3% shifts on big
runs, size alone would flag noise on small ones.

Runs of scripted users (both sides with flows.parquet) also compare flow
durations, end to end per task invocation, as `flow_p50` ... `flow_dist`.

Single runs cannot show run-to-run spread (a noisy neighbour, a thermal
throttle); the threshold is the guard then. Folders of repeated runs let the
bootstrap resample whole runs, so between-run spread widens the interval.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from servescope.analyzers.stats import PERCENTILES, compare_stat, proportion_test, rank_test
from servescope.errors import UsageError
from servescope.rundir.reader import RunData, load_run
from servescope.rundir.schema import RUN_JSON, RunDirError

LATENCY_METRICS: dict[str, str] = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}
LATENCY_STATS: tuple[str, ...] = ("p50", "p90", "p99", "mean")
FLOW_METRIC, FLOW_LABEL = "flow", "flow duration"  # scripted users' task invocations (successful flows)
# A percentile is compared only when each side has this many samples beyond it: with
# fewer, the bootstrap cannot see past the sample's largest values, its interval comes
# out too narrow, and two runs of one build "differ" (a p99 of 120 requests is their
# second-slowest one). p99 thus needs 500 requests a side, p90 50.
MIN_TAIL_SAMPLES = 5
SLICE_DIMENSIONS: tuple[str, ...] = ("prompt_bucket", "output_bucket", "tenant", "phase", "user_class", "task")
DEFAULT_GATES: tuple[str, ...] = ("ttft_p99", "tpot_p99", "e2e_p99", "output_tok_per_s")
GATE_ALIASES: dict[str, str] = {"throughput": "output_tok_per_s", "tok_per_s": "output_tok_per_s", "rps": "req_per_s"}
# run.json fields that must agree for a comparison to mean anything: what was sent, and how.
_SAME_LOAD_FIELDS: tuple[str, ...] = ("workload", "load_model", "load", "duration_s", "requests_limit")
WARMUP_PHASE = "warmup"

VERDICT_REGRESSED = "regressed"
VERDICT_IMPROVED = "improved"
VERDICT_SAME = "no significant change"
VERDICT_FEW = "too few samples"


class CompareInputError(UsageError):
    """The two sides cannot be compared (missing runs, empty runs, different workloads)."""


@dataclass(frozen=True)
class CompareSettings:
    """How strict a comparison is.

    `threshold`: the smallest relative change that counts (0.05 = 5%).
    `alpha`: the significance level of each test (two-sided).
    `error_margin`: the smallest absolute error-rate change that counts (0.01 = 1 point).
    `gates`: metric names whose regression fails the comparison (exit 1).
    `min_samples`: metrics with fewer samples on either side (all runs together) get no verdict.
    """

    threshold: float = 0.05
    alpha: float = 0.05
    error_margin: float = 0.01
    gates: tuple[str, ...] = DEFAULT_GATES
    min_samples: int = 20
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 10.0:
            raise ValueError(f"threshold must be a fraction such as 0.05 (5%), got {self.threshold}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), e.g. 0.05, got {self.alpha}")
        if not 0.0 <= self.error_margin <= 1.0:
            raise ValueError(f"error_margin must be a fraction in [0, 1], got {self.error_margin}")
        if self.min_samples < 2 or self.n_boot < 200:
            raise ValueError("min_samples must be >= 2 and n_boot >= 200")
        gates = tuple(GATE_ALIASES.get(g, g) for g in self.gates)
        unknown = [g for g in gates if g not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown gate(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)} or 'throughput'")
        object.__setattr__(self, "gates", gates)


@dataclass(frozen=True)
class MetricSpec:
    """One comparable figure: what column, which statistic, and which direction is worse."""

    name: str
    label: str
    unit: str  # "s", "req/s", "tok/s", "fraction"
    higher_is_worse: bool
    relative: bool = True


def _metric_specs() -> dict[str, MetricSpec]:
    specs: dict[str, MetricSpec] = {}
    for key, label in LATENCY_METRICS.items():
        for stat in LATENCY_STATS:
            specs[f"{key}_{stat}"] = MetricSpec(f"{key}_{stat}", f"{label} {stat}", "s", True)
        specs[f"{key}_dist"] = MetricSpec(f"{key}_dist", f"{label} distribution (median, rank test)", "s", True)
    for stat in LATENCY_STATS:
        specs[f"{FLOW_METRIC}_{stat}"] = MetricSpec(f"{FLOW_METRIC}_{stat}", f"{FLOW_LABEL} {stat}", "s", True)
    specs[f"{FLOW_METRIC}_dist"] = MetricSpec(f"{FLOW_METRIC}_dist", f"{FLOW_LABEL} distribution (median, rank test)", "s", True)
    specs["req_per_s"] = MetricSpec("req_per_s", "requests/s", "req/s", False)
    specs["output_tok_per_s"] = MetricSpec("output_tok_per_s", "output tokens/s", "tok/s", False)
    specs["error_rate"] = MetricSpec("error_rate", "error rate", "fraction", True, relative=False)
    return specs


ALL_METRICS: dict[str, MetricSpec] = _metric_specs()


@dataclass
class MetricResult:
    """The comparison of one metric (overall or within one slice)."""

    name: str
    label: str
    unit: str
    base: float | None
    cand: float | None
    change: float | None  # relative, or absolute for error_rate
    relative: bool
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n_base: int
    n_cand: int
    verdict: str
    gated: bool = False
    note: str = ""

    @property
    def failed_gate(self) -> bool:
        return self.gated and self.verdict == VERDICT_REGRESSED


@dataclass
class SliceComparison:
    dimension: str
    value: str
    metrics: list[MetricResult]


@dataclass
class Comparison:
    """Everything `servescope compare` reports; `exit_code` is what CI acts on."""

    base_path: str
    cand_path: str
    base_runs: list[str]
    cand_runs: list[str]
    settings: CompareSettings
    overall: list[MetricResult]
    slices: list[SliceComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gate_failures(self) -> list[MetricResult]:
        return [m for m in self.overall if m.failed_gate]

    @property
    def exit_code(self) -> int:
        return 1 if self.gate_failures else 0

    def metric(self, name: str) -> MetricResult:
        for m in self.overall:
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r} in this comparison")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"]["gates"] = list(self.settings.gates)
        data["exit_code"] = self.exit_code
        data["gate_failures"] = [m.name for m in self.gate_failures]
        return data


# ---------------------------------------------------------------- loading

@dataclass
class RunGroup:
    """One side of a comparison: one or more runs of the same build and workload."""

    path: Path
    runs: list[RunData]

    @property
    def labels(self) -> list[str]:
        return [str(r.path) for r in self.runs]


def load_group(path: str | Path, side: str) -> RunGroup:
    """A run directory, or a folder whose subfolders are run directories (repeated runs)."""
    root = Path(path)
    if not root.is_dir():
        raise CompareInputError(f"{side} {root}: no such directory; pass a run directory or a folder of repeated runs")
    if (root / RUN_JSON).exists():
        dirs = [root]
    else:
        dirs = sorted((d for d in root.iterdir() if (d / RUN_JSON).is_file()), key=_natural_key)
        if not dirs:
            raise CompareInputError(
                f"{side} {root} is neither a run directory (no {RUN_JSON}) nor a folder of repeated runs "
                f"(no subfolder has a {RUN_JSON}); pass the --out directory of `servescope run`"
            )
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except RunDirError as exc:
            raise CompareInputError(f"{side}: {exc}") from exc
    for run in runs:
        measured = _measured(run)
        if len(measured) == 0:
            raise CompareInputError(f"{side} run {run.path} has no measured requests (only warm-up, or none at all)")
        if not (measured["status"] == "ok").any():
            raise CompareInputError(f"{side} run {run.path} has no successful request: nothing to compare latency on")
    return RunGroup(root, runs)


def check_comparable(base: RunGroup, cand: RunGroup) -> list[str]:
    """Raise CompareInputError listing what differs when the runs did not send the same load.

    Returns notes about harmless differences worth a line in the report.
    """
    reference = base.runs[0]
    problems: list[str] = []
    for group, side in ((base, "baseline"), (cand, "candidate")):
        for run in group.runs:
            if run is reference:
                continue
            for key in _SAME_LOAD_FIELDS:
                if key in reference.run or key in run.run:
                    for diff in _diff(reference.run.get(key), run.run.get(key), key):
                        problems.append(f"{diff}  ({reference.path} vs {side} {run.path})")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CompareInputError(
            "the runs did not send the same load, so their latencies are not comparable:\n  "
            f"{shown}{more}\nRe-run both sides with the same --workload and load flags."
        )
    notes = []
    statuses = {str(r.run.get("status")) for g in (base, cand) for r in g.runs}
    if statuses - {"complete"}:
        notes.append(f"run status other than complete: {', '.join(sorted(statuses))}")
    if len(base.runs) == 1 or len(cand.runs) == 1:
        notes.append(
            "a side has a single run, so run-to-run spread is invisible to the statistics; "
            "use `servescope run --repeat 3` on both sides for a noise-aware verdict"
        )
    return notes


# ---------------------------------------------------------------- comparing

def compare_runs(base_path: str | Path, cand_path: str | Path, settings: CompareSettings | None = None) -> Comparison:
    """Compare a baseline with a candidate (each a run directory or a folder of repeated runs)."""
    settings = settings or CompareSettings()
    base, cand = load_group(base_path, "baseline"), load_group(cand_path, "candidate")
    notes = check_comparable(base, cand)
    rng = np.random.default_rng(settings.seed)
    base_frames = [_measured(r) for r in base.runs]
    cand_frames = [_measured(r) for r in cand.runs]
    overall = _latency_results(base, cand, base_frames, cand_frames, settings, rng, settings.min_samples)
    overall += _flow_results(base, cand, settings, rng, notes)
    overall += _throughput_results(base_frames, cand_frames, settings, rng)
    overall.append(_error_result(base_frames, cand_frames, settings, rng))
    for m in overall:
        m.gated = m.name in settings.gates
    order = {name: i for i, name in enumerate(ALL_METRICS)}
    overall.sort(key=lambda m: order[m.name])
    slices = _slice_results(base, cand, base_frames, cand_frames, settings, rng)
    return Comparison(
        base_path=str(base.path), cand_path=str(cand.path), base_runs=base.labels, cand_runs=cand.labels,
        settings=settings, overall=overall, slices=slices, notes=notes,
    )


def _latency_results(
    base: RunGroup, cand: RunGroup, base_frames: Sequence[pd.DataFrame], cand_frames: Sequence[pd.DataFrame],
    settings: CompareSettings, rng: np.random.Generator, min_samples: int,
) -> list[MetricResult]:
    results = []
    for key in LATENCY_METRICS:
        b = [_latency_values(run, frame, key) for run, frame in zip(base.runs, base_frames)]
        c = [_latency_values(run, frame, key) for run, frame in zip(cand.runs, cand_frames)]
        results += _distribution_results(key, b, c, settings, rng, min_samples)
    return results


def _flow_results(base: RunGroup, cand: RunGroup, settings: CompareSettings, rng: np.random.Generator,
                  notes: list[str]) -> list[MetricResult]:
    """Flow durations of every run's measured, successful flows; none when neither side has scripted users."""
    with_flows = [not r.flows.empty for r in base.runs + cand.runs]
    if not any(with_flows):
        return []
    if not all(with_flows):
        notes.append("only some runs have flows (scripted users): flow durations are not compared")
        n_b, n_c = (sum(len(_flow_durations(r)) for r in g.runs) for g in (base, cand))
        return [_few(spec, n_b, n_c, settings.min_samples, "a run on one side has no flows")
                for name, spec in ALL_METRICS.items() if name.startswith(f"{FLOW_METRIC}_")]
    b = [_flow_durations(r) for r in base.runs]
    c = [_flow_durations(r) for r in cand.runs]
    return _distribution_results(FLOW_METRIC, b, c, settings, rng, settings.min_samples)


def _flow_durations(run: RunData) -> np.ndarray:
    flows = run.flows
    keep = (flows["phase"].fillna("") != WARMUP_PHASE) & (flows["status"] == "ok")
    values = flows.loc[keep, "duration_s"].to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _distribution_results(
    key: str, b: list[np.ndarray], c: list[np.ndarray], settings: CompareSettings, rng: np.random.Generator, min_samples: int,
) -> list[MetricResult]:
    """`key`'s percentiles, mean and whole distribution compared, from each run's values on each side."""
    results = []
    n_b, n_c = sum(len(v) for v in b), sum(len(v) for v in c)
    too_few = min(n_b, n_c) < min_samples or min(len(v) for v in b + c) == 0
    for stat in LATENCY_STATS:
        spec = ALL_METRICS[f"{key}_{stat}"]
        if too_few:
            results.append(_few(spec, n_b, n_c, min_samples))
            continue
        tail_needed = math.ceil(MIN_TAIL_SAMPLES / (1 - PERCENTILES[stat])) if stat in PERCENTILES else 0
        if min(n_b, n_c) < tail_needed:
            results.append(_few(spec, n_b, n_c, tail_needed,
                                f"{stat} is compared from {tail_needed} samples a side ({MIN_TAIL_SAMPLES} beyond it); "
                                "run longer or --repeat more"))
            continue
        est = compare_stat(b, c, stat, alpha=settings.alpha, n_boot=settings.n_boot, rng=rng)
        results.append(_result(spec, est.base, est.cand, est.change, est.ci_low, est.ci_high, est.p_value,
                               n_b, n_c, est.significant(settings.alpha), settings.threshold))
    spec = ALL_METRICS[f"{key}_dist"]
    if too_few:
        return results + [_few(spec, n_b, n_c, min_samples)]
    est = compare_stat(b, c, "p50", alpha=settings.alpha, n_boot=settings.n_boot, rng=rng)
    p_value, prob_slower = rank_test(b, c)
    significant = p_value < settings.alpha and est.significant(settings.alpha)
    res = _result(spec, est.base, est.cand, est.change, est.ci_low, est.ci_high, p_value,
                  n_b, n_c, significant, settings.threshold)
    res.note = f"P(candidate {'flow' if key == FLOW_METRIC else 'request'} slower) = {prob_slower:.2f}"
    results.append(res)
    return results


def _throughput_results(
    base_frames: Sequence[pd.DataFrame], cand_frames: Sequence[pd.DataFrame],
    settings: CompareSettings, rng: np.random.Generator,
) -> list[MetricResult]:
    results = []
    for name, column in (("req_per_s", None), ("output_tok_per_s", "output_tokens")):
        spec = ALL_METRICS[name]
        b = [throughput_windows(f, column) for f in base_frames]
        c = [throughput_windows(f, column) for f in cand_frames]
        est = compare_stat(b, c, "mean", alpha=settings.alpha, n_boot=settings.n_boot, rng=rng)
        n_b, n_c = sum(int((f["status"] == "ok").sum()) for f in base_frames), sum(int((f["status"] == "ok").sum()) for f in cand_frames)
        res = _result(spec, est.base, est.cand, est.change, est.ci_low, est.ci_high, est.p_value,
                      n_b, n_c, est.significant(settings.alpha), settings.threshold)
        res.note = f"mean over {sum(len(v) for v in b)}/{sum(len(v) for v in c)} time windows"
        results.append(res)
    return results


def _error_result(
    base_frames: Sequence[pd.DataFrame], cand_frames: Sequence[pd.DataFrame],
    settings: CompareSettings, rng: np.random.Generator,
) -> MetricResult:
    spec = ALL_METRICS["error_rate"]
    b = [(f["status"] != "ok").to_numpy(dtype=float) for f in base_frames]
    c = [(f["status"] != "ok").to_numpy(dtype=float) for f in cand_frames]
    est = compare_stat(b, c, "mean", alpha=settings.alpha, relative=False, n_boot=settings.n_boot, rng=rng)
    n_b, n_c = sum(len(v) for v in b), sum(len(v) for v in c)
    p_value = proportion_test(int(sum(v.sum() for v in b)), n_b, int(sum(v.sum() for v in c)), n_c)
    significant = p_value < settings.alpha and est.significant(settings.alpha)
    return _result(spec, est.base, est.cand, est.change, est.ci_low, est.ci_high, p_value,
                   n_b, n_c, significant, settings.error_margin)


def _slice_results(
    base: RunGroup, cand: RunGroup, base_frames: Sequence[pd.DataFrame], cand_frames: Sequence[pd.DataFrame],
    settings: CompareSettings, rng: np.random.Generator,
) -> list[SliceComparison]:
    slices = []
    for dim in SLICE_DIMENSIONS:
        values_b = set().union(*(set(f[dim].dropna().astype(str)) for f in base_frames))
        values_c = set().union(*(set(f[dim].dropna().astype(str)) for f in cand_frames))
        shared = sorted(values_b & values_c, key=_natural_key)
        if len(shared) < 2 and values_b == values_c:
            continue  # one value everywhere: the slice is the whole run, already compared
        for value in shared:
            b_sub = _subset_group(base, base_frames, dim, value)
            c_sub = _subset_group(cand, cand_frames, dim, value)
            metrics = [
                m for m in _latency_results(b_sub[0], c_sub[0], b_sub[1], c_sub[1], settings, rng, settings.min_samples)
                if m.name.split("_")[1] in ("p50", "p99", "dist")
            ]
            slices.append(SliceComparison(dim, value, metrics))
    return slices


def _subset_group(group: RunGroup, frames: Sequence[pd.DataFrame], dim: str, value: str) -> tuple[RunGroup, list[pd.DataFrame]]:
    """The runs restricted to one slice (runs without that slice value are left out)."""
    runs, subs = [], []
    for run, frame in zip(group.runs, frames):
        sub = frame[frame[dim].astype(str) == value]
        if (sub["status"] == "ok").any():
            runs.append(run)
            subs.append(sub)
    return RunGroup(group.path, runs), subs


# ---------------------------------------------------------------- per-run figures

def throughput_windows(frame: pd.DataFrame, column: str | None, target_window_s: float = 1.0) -> np.ndarray:
    """Completion rate in equal time windows over the measured span (one value per window).

    Why windows: a run's throughput is one number, which has no spread to test
    against. Rates per window do, and their mean is the run's throughput over
    the span. The span runs from the first send to the last send, so the
    cool-down tail (requests finishing after the load stopped) is left out, as
    DESIGN.md asks. `column` None counts requests; else sums that column.
    """
    ok = frame[frame["status"] == "ok"]
    start = float(frame["sent_at"].min())
    stop = float(frame["sent_at"].max())
    if not np.isfinite(start) or stop - start < 1e-3:
        stop = float(ok["end_at"].max())
    span = max(stop - start, 1e-3)
    n_windows = int(np.clip(round(span / target_window_s), 4, 60))
    edges = np.linspace(start, stop, n_windows + 1)
    weights = None if column is None else ok[column].fillna(0).to_numpy(dtype=float)
    counts, _ = np.histogram(ok["end_at"].to_numpy(dtype=float), bins=edges, weights=weights)
    return counts / (span / n_windows)


def _latency_values(run: RunData, frame: pd.DataFrame, key: str) -> np.ndarray:
    ok_mask = (frame["status"] == "ok").to_numpy()
    if key == "itl":
        row_mask = np.zeros(len(run.requests), dtype=bool)
        row_mask[frame.index[ok_mask]] = True
        values = run.pooled_itl(row_mask)
    else:
        values = frame.loc[ok_mask, f"{key}_s"].to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _measured(run: RunData) -> pd.DataFrame:
    """Requests outside warm-up, with their original row index (pooled_itl masks rely on it)."""
    frame = run.requests
    return frame[frame["phase"].fillna("") != WARMUP_PHASE]


# ---------------------------------------------------------------- verdicts

def verdict(change: float | None, significant: bool, higher_is_worse: bool, min_effect: float) -> str:
    """Regressed/improved only when the change is both significant and at least `min_effect`."""
    if change is None or not np.isfinite(change) or not significant or abs(change) < min_effect:
        return VERDICT_SAME
    worse = change > 0 if higher_is_worse else change < 0
    return VERDICT_REGRESSED if worse else VERDICT_IMPROVED


def _result(
    spec: MetricSpec, base: float, cand: float, change: float, lo: float, hi: float, p: float,
    n_b: int, n_c: int, significant: bool, min_effect: float,
) -> MetricResult:
    return MetricResult(
        name=spec.name, label=spec.label, unit=spec.unit, base=_finite(base), cand=_finite(cand),
        change=_finite(change), relative=spec.relative, ci_low=_finite(lo), ci_high=_finite(hi),
        p_value=_finite(p), n_base=n_b, n_cand=n_c,
        verdict=verdict(change, significant, spec.higher_is_worse, min_effect),
    )


def _few(spec: MetricSpec, n_b: int, n_c: int, min_samples: int, note: str | None = None) -> MetricResult:
    return MetricResult(
        name=spec.name, label=spec.label, unit=spec.unit, base=None, cand=None, change=None,
        relative=spec.relative, ci_low=None, ci_high=None, p_value=None, n_base=n_b, n_cand=n_c,
        verdict=VERDICT_FEW, note=note or f"fewer than {min_samples} samples on a side (or a run without any)",
    )


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _diff(a: Any, b: Any, path: str) -> Iterable[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {json.dumps(a, default=str)[:80]} != {json.dumps(b, default=str)[:80]}"


def _natural_key(item: Any) -> list[Any]:
    """Sort run-2 before run-10 and '128-512' before '1024-2048'."""
    text = item.name if isinstance(item, Path) else str(item)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
