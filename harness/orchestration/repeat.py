"""`--repeat N`, and the entry point of every run: `execute_run(config)`.

`servescope.run(...)` is the same call from Python, with the fields of
`RunConfig` (the flags of `servescope run`) as keyword arguments.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from servescope.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from servescope.harness.api import RunOutcome, default_out_dir, execute_once
from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole


def run(**options: Any) -> RunOutcome:
    """One run from Python: the keyword arguments are `RunConfig`'s fields (`target`, `workload`,
    `rate`, `concurrency`, `duration_s`, `slo`, `out`, ...).

    >>> outcome = servescope.run(target="http://127.0.0.1:8000", workload="chat", rate=4,
    ...                          duration_s="30s", out="runs/chat")      # doctest: +SKIP
    >>> servescope.load_run(outcome.run_dir).requests["ttft_s"].quantile(0.99)  # doctest: +SKIP

    Raises `ConfigError` (a `servescope.UsageError`) for options that cannot work, before
    anything is sent or written. Progress is not printed unless `show_progress=True`.
    """
    options.setdefault("show_progress", False)
    return execute_run(RunConfig(**options))


def execute_run(config: RunConfig, console: RunConsole | None = None) -> RunOutcome:
    """Run `config` (repeated `config.repeat` times into OUT/run-1..N) and return the outcome.

    Repetition i runs with seed `config.seed + i - 1`: the same seed would send the same prompts
    again, and a server that keeps its prefix cache (vLLM's default, the reference engine's) would
    serve every repetition after the first from it. The seeds are the same for the same
    `--seed` and `--repeat`, so nightly runs still pair up prompt for prompt."""
    console = console or RunConsole(config.show_progress)
    out = Path(config.out) if config.out else default_out_dir()
    if config.repeat == 1:
        return execute_once(config, out, console)
    outcomes: list[RunOutcome] = []
    for i in range(1, config.repeat + 1):
        console.info(f"repeat {i}/{config.repeat}")
        outcome = execute_once(replace(config, repeat=1, seed=config.seed + i - 1, out=str(out / f"run-{i}")),
                                out / f"run-{i}", console, last=i == config.repeat)
        outcomes.append(outcome)
        if outcome.status != "complete":
            break  # interrupted or failed: the remaining repetitions would not be comparable
    worst = max(outcomes, key=lambda o: _severity(o.exit_code))
    return RunOutcome(out, worst.status, worst.exit_code, None, outcomes)


def _severity(code: int) -> int:
    return {EXIT_OK: 0, EXIT_FAILED: 1, EXIT_INTERRUPTED: 2, EXIT_USAGE: 3}.get(code, 1)
