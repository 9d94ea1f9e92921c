"""servescope: load-test LLM serving endpoints, record every request, diagnose the latency.

The public API, for scripts and notebooks (each name is imported on first use,
so `import servescope` stays cheap in worker processes):

* `run(**options)` / `execute_run(config)` - one measured run (or `repeat` of them), as
  `servescope run` does it; returns a `RunOutcome` (run directory, status, exit code, summary);
* `RunConfig` - everything a run needs, validated;
* `load_run(run_dir) -> RunData` - a run directory as pandas frames
  (`.run` is run.json, `.requests` one row per request, `.server_metrics`);
* `build_report(run_dir, slos=None)` - summary.json, findings.json, report.html;
* `parse_slos("ttft_p99=500ms,error_rate=0.1%")`, `SLO`;
* `User`, `task`, `between`, `constant`, `constant_pacing`, `constant_throughput`,
  `StopUser`, `Response`, `CallError` - scripted users (`servescope run --users FILE.py`):
  Locust-shaped classes whose `@task` coroutines call the model, measured to the chunk;
* `UsageError` - the base of every error a user can cause (exit status 2);
* the run-directory contract: `FORMAT_VERSION`, `RequestRecord`,
  `REQUEST_COLUMNS`, `FlowRecord`, `FLOW_COLUMNS`, `RunDirError` (see `servescope.rundir`).
"""

from __future__ import annotations

import importlib
import os as _os
from typing import TYPE_CHECKING, Any

from servescope.version import __version__

# In a source checkout the subpackages are the repository's top-level folders
# (harness/, workloads/, ...) beside this one; an installed copy holds them
# inside this folder. Searching the checkout's root finds them either way, for
# an editable install as for `python -c` run from the root.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_ROOT = _os.path.dirname(_HERE)
if not _os.path.isdir(_os.path.join(_HERE, "harness")) and _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")):
    __path__.append(_ROOT)  # noqa: F821 - the package's own __path__

_PUBLIC: dict[str, str] = {
    "run": "servescope.harness.orchestration.repeat",
    "execute_run": "servescope.harness.orchestration.repeat",
    "RunOutcome": "servescope.harness.api",
    "RunConfig": "servescope.harness.config",
    "load_run": "servescope.rundir.reader",
    "RunData": "servescope.rundir.reader",
    "RunDirError": "servescope.rundir.schema",
    "FORMAT_VERSION": "servescope.rundir.schema",
    "RequestRecord": "servescope.rundir.schema",
    "REQUEST_COLUMNS": "servescope.rundir.schema",
    "build_report": "servescope.analyzers.report",
    "parse_slos": "servescope.slo",
    "SLO": "servescope.slo",
    "UsageError": "servescope.errors",
    "FlowRecord": "servescope.rundir.schema",
    "FLOW_COLUMNS": "servescope.rundir.schema",
    "User": "servescope.harness.users.user",
    "task": "servescope.harness.users.user",
    "between": "servescope.harness.users.user",
    "constant": "servescope.harness.users.user",
    "constant_pacing": "servescope.harness.users.user",
    "constant_throughput": "servescope.harness.users.user",
    "StopUser": "servescope.harness.users.user",
    "Response": "servescope.harness.users.response",
    "CallError": "servescope.harness.users.response",
}

__all__ = [
    "FLOW_COLUMNS", "FORMAT_VERSION", "REQUEST_COLUMNS", "SLO", "CallError", "FlowRecord", "RequestRecord", "Response",
    "RunConfig", "RunData", "RunDirError", "RunOutcome", "StopUser", "UsageError", "User", "__version__", "between",
    "build_report", "constant", "constant_pacing", "constant_throughput", "execute_run", "load_run", "parse_slos",
    "run", "task",
]

if TYPE_CHECKING:
    from servescope.analyzers.report import build_report
    from servescope.harness.api import RunOutcome
    from servescope.harness.orchestration.repeat import execute_run, run
    from servescope.harness.config import RunConfig
    from servescope.rundir.reader import RunData, load_run
    from servescope.harness.users.response import CallError, Response
    from servescope.harness.users.user import (
        StopUser, User, between, constant, constant_pacing, constant_throughput, task,
    )
    from servescope.rundir.schema import FLOW_COLUMNS, FORMAT_VERSION, REQUEST_COLUMNS, FlowRecord, RequestRecord, RunDirError
    from servescope.errors import UsageError
    from servescope.slo import SLO, parse_slos


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'servescope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
