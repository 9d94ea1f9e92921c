"""`servescope lab NAME`: a scripted experiment and its control on the reference engine.

Each lab runs the same short workload twice on the tiny preset (CPU is
enough): once with the cause switched on (the experiment) and once with it
off (the control); `servescope.analyzers.lab` then checks that the matching
diagnosis rule fires for the experiment and stays silent for the control. It
is a demonstration of what each finding looks like, and an end-to-end test
that the rules see real engine behaviour rather than only synthetic tables.

The labs are defined here; the heavy imports wait until one runs, so listing
them (`servescope lab --help`) stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from servescope.errors import UsageError

if TYPE_CHECKING:
    from servescope.analyzers.lab import LabResult, LabSideResult

ENGINE = "reference:tiny"


class LabError(UsageError):
    """A lab could not run (engine failed to start, a run failed); the message says which side and why."""


@dataclass(frozen=True)
class LabSide:
    """One run of a lab: engine flags, a workload (the YAML content) and the load model."""

    engine_args: tuple[str, ...]
    workload: dict[str, Any]
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 8.0
    warmup_s: float = 1.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a lab side needs exactly one of rate or concurrency")
        if self.duration_s <= 0:
            raise ValueError("duration_s must be positive")


@dataclass(frozen=True)
class Lab:
    name: str
    rule: str  # the finding the experiment must produce and the control must not
    question: str
    experiment_label: str
    control_label: str
    experiment: LabSide
    control: LabSide


def _fixed(name: str, prompt: int, output: int, weight: int = 1, **extra: Any) -> dict[str, Any]:
    return {"name": name, "weight": weight, "api": "completions", "prompt_tokens": prompt, "output_tokens": output, **extra}


def _workload(name: str, *classes: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "description": f"servescope lab workload ({name})", "classes": list(classes)}


_CONVOY_MIX = _workload("lab-convoy", _fixed("short", 48, 48, weight=6), _fixed("long", 1536, 4, weight=1))
_SPEC = _workload("lab-spec", _fixed("gen", 64, 96))
_PREEMPT = _workload("lab-preemption", _fixed("gen", 128, 96))
_SATURATION = _workload("lab-saturation", _fixed("gen", 64, 48))
_STALL = _workload("lab-stall", _fixed("short", 48, 32, weight=3), _fixed("long", 512, 32, weight=1))
_PD_MIX = _workload("lab-pd", _fixed("chat", 64, 48, weight=4), _fixed("answer", 256, 4, weight=2),
                    _fixed("document", 1024, 24, weight=1))

# Durations are as short as still gives each rule enough requests on 2 CPU cores
# (the lab tests run every lab); `--scale` lengthens them for steadier numbers.
LABS: dict[str, Lab] = {
    "convoy": Lab(
        name="convoy", rule="convoy",
        question="Do long prefills stall short requests when chunked prefill is off?",
        experiment_label="--no-chunked-prefill", control_label="chunked prefill, 512-token steps",
        experiment=LabSide(("--no-chunked-prefill",), _CONVOY_MIX, rate=6.0, duration_s=8.0),
        control=LabSide(("--max-num-batched-tokens", "512"), _CONVOY_MIX, rate=6.0, duration_s=8.0),
    ),
    "preemption": Lab(
        name="preemption", rule="preemption",
        question="Does a KV cache too small for the batch force preemptions?",
        experiment_label="--num-kv-blocks 48 (tiny)", control_label="default KV budget",
        experiment=LabSide(("--num-kv-blocks", "48"), _PREEMPT, concurrency=12, duration_s=5.0),
        control=LabSide((), _PREEMPT, concurrency=12, duration_s=5.0),
    ),
    "prefix-cache": Lab(
        name="prefix-cache", rule="prefix_cache",
        question="Do requests sharing a prefix hit the prefix cache, and how much faster do they start?",
        experiment_label="768-token shared prefix", control_label="no shared prefix",
        experiment=LabSide((), _workload("lab-prefix", _fixed("shared", 896, 16, prefix={"group": "lab-system", "tokens": 768})),
                           rate=4.0, duration_s=5.0),
        control=LabSide((), _workload("lab-noprefix", _fixed("plain", 896, 16)), rate=4.0, duration_s=5.0),
    ),
    "spec": Lab(
        name="spec", rule="spec_decode",
        question="How much of speculative decoding's drafting is accepted, and where does it lose?",
        # The fixed policy (every request drafts 4 tokens a step): the adaptive default stops drafting
        # where acceptance is low, which is what this lab's rule must see happen.
        experiment_label="--spec ngram:k=4,adaptive=0", control_label="speculation off",
        experiment=LabSide(("--spec", "ngram:k=4,adaptive=0"), _SPEC, rate=4.0, duration_s=5.0),
        control=LabSide((), _SPEC, rate=4.0, duration_s=5.0),
    ),
    "saturation": Lab(
        name="saturation", rule="queueing",
        question="What happens when requests arrive faster than the server completes them?",
        experiment_label="rate 20 req/s, above capacity (--max-num-seqs 2)",
        control_label="rate 2.5 req/s, below capacity (--max-num-seqs 2)",
        experiment=LabSide(("--max-num-seqs", "2"), _SATURATION, rate=20.0, duration_s=4.0),
        # Capacity is about 6 req/s on 2 CPU cores (the experiment completes 6.2 req/s): the control
        # runs at about 40% of it, a margin for slower machines (at 3.5 req/s, a CI run's bursts
        # queued enough to look saturated).
        control=LabSide(("--max-num-seqs", "2"), _SATURATION, rate=2.5, duration_s=10.0),
    ),
    "stall": Lab(
        name="stall", rule="stall",
        question="When the whole server stops for a moment, do the findings say when, and that every request waited?",
        experiment_label="--debug-pause 5s:3s (the engine stands still 3 s every 5 s)",
        control_label="no pause",
        # A pause must outlast the stall rule's shortest window (2 s, and 30 typical gaps between
        # first tokens and stream ends) with requests in flight: at 8 req/s about 24 arrive in one.
        experiment=LabSide(("--debug-pause", "5s:3s"), _STALL, rate=8.0, duration_s=12.0),
        control=LabSide((), _STALL, rate=8.0, duration_s=8.0),
    ),
    "pd": Lab(
        name="pd", rule="kv_transfer",
        question="Does disaggregating prefill and decode steady TTFT, and what does the KV transfer cost the decode side?",
        experiment_label="--disaggregate 1:1 --kv-transport socket (KV through the server)",
        control_label="one colocated engine, chunked prefill, 512-token steps",
        # The same machine: the two engine processes of the experiment each take a core where the control's one
        # engine takes one (the tiny model runs fastest on one thread), as P and D pools take a GPU each. The KV
        # goes the slow way, through the server, as over a congested link: on shared memory the tiny model's
        # transfers are too cheap to be the bottleneck this lab is about.
        experiment=LabSide(("--disaggregate", "1:1", "--kv-transport", "socket", "--max-num-batched-tokens", "512"),
                           _PD_MIX, rate=4.0,
                           duration_s=8.0),
        control=LabSide(("--max-num-batched-tokens", "512"), _PD_MIX, rate=4.0, duration_s=8.0),
    ),
}


def run_lab(name: str, out: str | Path, *, duration_scale: float = 1.0, show_progress: bool = False,
            on_side: Callable[[str, str], None] | None = None, ray: str | None = None) -> LabResult:
    """Run lab `name` into `out` (experiment/, control/, report.html) and judge it.

    `on_side(side, label)` is called as each run starts (the CLI prints it).
    """
    if name not in LABS:
        raise KeyError(f"unknown lab {name!r}; choose one of {', '.join(LABS)}")
    lab = LABS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sides = {}
    for side_name, side, label in (("experiment", lab.experiment, lab.experiment_label), ("control", lab.control, lab.control_label)):
        if on_side is not None:
            on_side(side_name, label)
        sides[side_name] = _run_side(out / side_name, side, label, duration_scale, show_progress, ray)
    from servescope.analyzers.lab import LabResult, lab_checks, write_lab_report

    result = LabResult(lab, out, sides["experiment"], sides["control"])
    result.checks = lab_checks(result)
    result.report = write_lab_report(result)
    return result


def _run_side(run_dir: Path, side: LabSide, label: str, duration_scale: float, show_progress: bool,
              ray: str | None = None) -> LabSideResult:
    from rich.console import Console

    from servescope.analyzers.lab import judge_side
    from servescope.harness.orchestration.repeat import execute_run
    from servescope.harness.config import RunConfig
    from servescope.harness.console import RunConsole

    run_dir.mkdir(parents=True, exist_ok=True)
    workload_file = run_dir.parent / f"{run_dir.name}.workload.yaml"
    workload_file.write_text(yaml.safe_dump(side.workload, sort_keys=False))
    config = RunConfig(
        engine=ENGINE, engine_args=side.engine_args, workload=str(workload_file),
        rate=side.rate, concurrency=side.concurrency,
        duration_s=side.duration_s * duration_scale, warmup_s=side.warmup_s,
        force_output_length=True, seed=0, out=str(run_dir), show_progress=show_progress, ray=ray,
        command_line=("servescope", "lab", run_dir.parent.name, run_dir.name),
    )
    # The run's console output goes to a log beside the run: the lab prints its own verdict.
    with open(run_dir.parent / f"{run_dir.name}.console.txt", "w", encoding="utf-8") as log:
        outcome = execute_run(config, RunConsole(False, console=Console(file=log, width=120)))
    if outcome.status == "failed":
        problems = json.loads((run_dir / "run.json").read_text()).get("problems", []) if (run_dir / "run.json").exists() else []
        raise LabError(f"the {run_dir.name} run ({label}) failed: {'; '.join(map(str, problems)) or 'see ' + str(run_dir)}")
    return judge_side(run_dir, label, outcome.status)
