"""The capacity search with real load: each step is one measured run at a fixed rate.

The search itself (grow, then bisect) and the judging of a step are the
analyzers' (`servescope.analyzers.capacity`); this module only sends the load.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from servescope.analyzers.capacity import (
    CapacityResult,
    CapacitySettings,
    StepResult,
    judge_step,
    search_capacity,
    write_capacity,
)
from servescope.analyzers.summary import summarize
from servescope.harness.orchestration.repeat import execute_run
from servescope.harness.targets.engine import EngineProcess
from servescope.rundir.reader import load_run
from servescope.slo import parse_slos


def run_capacity(base: Any, settings: CapacitySettings, out_dir: str | Path,
                 on_step: Callable[[StepResult], None] | None = None) -> CapacityResult:
    """Run the search with real load: each step is `harness.api.execute_run` of `base` at one rate.

    `base` is a `harness.config.RunConfig` carrying the target, workload and
    client options; its load model, duration, output folder and SLO are set per
    step. With no target, the reference engine is started once for the whole
    search (not once per step) and stopped at the end.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slos = parse_slos(settings.slo)
    counter = {"n": 0}

    def searched(target: str) -> CapacityResult:
        def probe(rate: float, duration_s: float) -> StepResult:
            counter["n"] += 1
            step_dir = out / f"step-{counter['n']:02d}-rate-{rate:.3g}"
            config = replace(
                base, target=target, engine=None, engine_args=(), rate=rate, concurrency=None, sweep=None,
                trace=None, duration_s=duration_s, requests=None, out=str(step_dir), slo=settings.slo,
                report=False, repeat=1,
            )
            execute_run(config)
            summary = summarize(load_run(step_dir), slos)
            return judge_step(summary, rate, duration_s, settings, run_dir=str(step_dir))

        return search_capacity(probe, settings, on_step)

    if base.target:
        result = searched(base.target)
    else:
        with EngineProcess(preset=base.engine_preset, extra_args=tuple(base.engine_args)).start() as engine:
            result = searched(engine.base_url)
    write_capacity(result, out)
    return result
