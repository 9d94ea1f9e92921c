"""Named incidents with known causes: each a function of (seed, size) -> SimSettings.

`EXPECTED[name]` is the set of rule ids that should name the planted cause at
medium or above; every other rule should stay below medium. `healthy` and
`output_tail` expect nothing: a long-output tail is how every server behaves.
A noisy tenant's requests wait in its own bursts, so naming that tenant
(`slice_outlier`) is as right as naming the queue.

Each incident is judged in two forms: the run directory servescope writes
(token gaps, server metrics, client timing) and the production-style log an
on-call engineer has (`output.LOG_COLUMNS`, imported as `servescope slice`
does). `UNSEEN_IN_LOG` names the causes a log cannot show, with the reason;
`expected(name, form)` is what each form should name.
"""

from __future__ import annotations

from collections.abc import Callable

from servescope.analyzers.incidents.simulator import ModelSpeed, SimSettings, Tenant

Incident = Callable[[int, int], SimSettings]


def healthy(seed: int, size: int) -> SimSettings:
    return SimSettings(seed=seed, requests=size)


def convoy(seed: int, size: int) -> SimSettings:
    """16k-token prompts on a server without chunked prefill: each freezes everyone for its prefill."""
    return SimSettings(seed=seed, requests=size, long_prompt_share=0.03, long_prompt_tokens=16000, chunked_prefill=False)


def stall(seed: int, size: int) -> SimSettings:
    """The whole server pauses 6 s every 100 s; everything in flight waits."""
    return SimSettings(seed=seed, requests=size, pause_every_s=100.0, pause_s=6.0)


def queueing(seed: int, size: int) -> SimSettings:
    """Arrivals outrun what the decode slots can complete: the queue grows all run long."""
    return SimSettings(seed=seed, requests=size, max_batch=8, batch_slowdown=0.02)


def preemption(seed: int, size: int) -> SimSettings:
    """A KV budget too small for the running requests' context: running requests are evicted and recompute."""
    return SimSettings(seed=seed, requests=size, prompt_median=2048, output_median=256, kv_budget_tokens=12000)


def cache_miss(seed: int, size: int) -> SimSettings:
    """Prefix group sys-1 (a third of the grouped traffic) stops hitting the prefix cache a third into the run."""
    s = SimSettings(seed=seed, requests=size, prefix_groups=3, prefix_tokens=1536, prompt_median=1800, prompt_sigma=0.3)
    s.miss_group, s.miss_from_s = 1, s.duration_s / 3
    return s


def rate_limit(seed: int, size: int) -> SimSettings:
    """team-c bursts far over its quota and gets HTTP 429 for much of it."""
    tenants = [Tenant("team-a", 3.0), Tenant("team-b", 2.0),
               Tenant("team-c", 1.0, burst_factor=12.0, burst_every_s=60.0, burst_s=15.0, quota_per_s=2)]
    return SimSettings(seed=seed, requests=size, tenants=tenants)


def noisy_tenant(seed: int, size: int) -> SimSettings:
    """team-c bursts to 15x its rate for 10 s a minute; everyone's requests queue behind its bursts."""
    tenants = [Tenant("team-a", 3.0), Tenant("team-b", 2.0),
               Tenant("team-c", 1.0, burst_factor=15.0, burst_every_s=60.0, burst_s=10.0)]
    return SimSettings(seed=seed, requests=size, tenants=tenants, max_batch=24)


def slow_model(seed: int, size: int) -> SimSettings:
    """Half the traffic on a model whose decode is 2.2x slower."""
    models = [ModelSpeed("llama-8b", 0.5), ModelSpeed("llama-8b-ft", 0.5, decode_step_s=0.012 * 2.2)]
    return SimSettings(seed=seed, requests=size, models=models)


def output_tail(seed: int, size: int) -> SimSettings:
    """Heavy-tailed output lengths: the E2E tail is long outputs, which is not a fault."""
    return SimSettings(seed=seed, requests=size, output_sigma=1.3, max_output=4096)


def client_bound(seed: int, size: int) -> SimSettings:
    """The load generator sends ~150 ms late on average: it, not the server, shapes the numbers."""
    return SimSettings(seed=seed, requests=size, schedule_lag_s=0.15)


def kv_transfer(seed: int, size: int) -> SimSettings:
    """Disaggregated prefill and decode over one slow shared link: every stream stalls ~80 ms after its first
    token, longer when transfers queue."""
    return SimSettings(seed=seed, requests=size, disaggregated=True, kv_transfer_base_s=0.06,
                       kv_transfer_s_per_token=2e-5)


INCIDENTS: dict[str, Incident] = {
    "healthy": healthy, "convoy": convoy, "stall": stall, "queueing": queueing, "preemption": preemption,
    "cache_miss": cache_miss, "rate_limit": rate_limit, "noisy_tenant": noisy_tenant, "slow_model": slow_model,
    "output_tail": output_tail, "client_bound": client_bound, "kv_transfer": kv_transfer,
}

EXPECTED: dict[str, frozenset[str]] = {
    "healthy": frozenset(), "convoy": frozenset({"convoy"}), "stall": frozenset({"stall"}),
    "queueing": frozenset({"queueing"}), "preemption": frozenset({"preemption"}),
    "cache_miss": frozenset({"prefix_cache"}), "rate_limit": frozenset({"rate_limit"}),
    "noisy_tenant": frozenset({"queueing", "slice_outlier"}), "slow_model": frozenset({"slice_outlier"}),
    "output_tail": frozenset(), "client_bound": frozenset({"client_bound"}),
    "kv_transfer": frozenset({"kv_transfer"}),
}

FORMS = ("run", "log")

# Causes a production-style log (LOG_COLUMNS) holds no trace of: the rule that names them reads data the log lacks.
UNSEEN_IN_LOG: dict[str, dict[str, str]] = {
    "preemption": {"preemption": "needs the server's preemption counter; a request log has no server metrics, "
                                 "and recomputed requests are only slower, like any queued one"},
    "cache_miss": {"prefix_cache": "needs the prefix group of each request to know which ones expected a hit; "
                                   "a log's cached_tokens alone cannot tell a lost hit from a prompt with no shared prefix"},
    "client_bound": {"client_bound": "needs the load generator's schedule lag and loop lag; a server's log has no "
                                     "client timing"},
    "kv_transfer": {"kv_transfer": "needs per-request transfer times, token gaps or the decode pool's metrics; "
                                   "a log's TTFT ends at the prefill pool's first token, before the transfer"},
}


def expected(name: str, form: str) -> frozenset[str]:
    """The rules that should name incident `name`'s cause at medium or above, in `form` (run or log)."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: use one of {', '.join(FORMS)}")
    return EXPECTED[name] - UNSEEN_IN_LOG.get(name, {}).keys() if form == "log" else EXPECTED[name]
