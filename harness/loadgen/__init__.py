"""Load models and scheduling: which session goes out when, over which worker.

- `models`: the load models (closed-loop concurrency, open-loop rate, trace replay) and `plan_phases`;
- `arrivals`: seeded open-loop send times (poisson / constant / gamma, with a linear ramp);
- `messages`: what the dispatcher and workers say to each other;
- `dispatcher`: the main process's side; `pool`: worker processes on this host.
"""

from servescope.harness.loadgen.models import (
    WARMUP_PHASE,
    ConcurrencyLoad,
    Phase,
    RateLoad,
    TraceLoad,
    default_workers,
    plan_phases,
)

__all__ = ["WARMUP_PHASE", "ConcurrencyLoad", "Phase", "RateLoad", "TraceLoad", "default_workers", "plan_phases"]
