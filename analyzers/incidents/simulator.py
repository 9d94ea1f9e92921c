"""A small, vectorized model of an LLM server, so diagnosis can be judged on incidents whose cause is known.

The model works on a time grid (GRID_S) instead of one event per token, so a
million requests simulate in seconds:

* arrivals: Poisson per tenant, optionally bursty (the rate multiplied during
  periodic bursts), thinned from the peak rate;
* quotas: a tenant's requests beyond its quota within one second get HTTP 429;
* admission: a fluid queue of seat-seconds against `max_batch` decode slots,
  so waiting grows when arrivals outrun completions and drains when they do not;
* prefill: (prompt - cached) tokens at the model's prefill rate; without
  chunked prefill a long prompt's prefill freezes every other request (convoy);
* decode: continuous batching, per-step time = the model's step x
  (1 + batch_slowdown x running requests);
* prefix cache: requests of a prefix group reuse its prefix with `cache_hit_rate`,
  except a group told to stop hitting from some time on;
* KV budget: when running requests hold more tokens than the budget, requests
  in flight are preempted and recompute their context (one long gap);
* pauses: the whole server stops (every request in flight waits);
* disaggregated prefill/decode: after its first token a request's KV crosses
  a link shared by all (a fluid queue of `kv_links` seats), so its stream
  stalls for the transfer before the second token.

Freezes (pauses and unchunked long prefills) are applied as a time warp: each
request is timed in server progress time, then mapped to wall time, so a
request in flight across a freeze sees one gap as long as the freeze.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GRID_S = 0.1
BLOCKING_PREFILL_S = 0.05  # unchunked prefills longer than this stall the decodes


@dataclass
class Tenant:
    name: str
    rate: float  # requests/s outside bursts
    burst_factor: float = 1.0  # rate multiplier during a burst
    burst_every_s: float = 0.0  # 0: never bursts
    burst_s: float = 0.0
    quota_per_s: int | None = None  # requests admitted per second; the rest get 429


@dataclass
class ModelSpeed:
    name: str
    share: float  # share of the traffic
    decode_step_s: float = 0.012  # per-step time of a batch of one
    prefill_tokens_per_s: float = 20000.0


@dataclass
class SimSettings:
    """Everything a simulated run depends on; incidents change a few fields (see catalogue.py)."""

    seed: int = 0
    requests: int = 3600  # approximate: the duration is chosen so the tenants' base rates give this many
    tenants: list[Tenant] = field(default_factory=lambda: [Tenant("team-a", 3.0), Tenant("team-b", 2.0), Tenant("team-c", 1.0)])
    models: list[ModelSpeed] = field(default_factory=lambda: [ModelSpeed("llama-8b", 1.0)])
    prompt_median: int = 512
    prompt_sigma: float = 0.8
    long_prompt_share: float = 0.0  # requests whose prompt is `long_prompt_tokens`
    long_prompt_tokens: int = 16000
    output_median: int = 128
    output_sigma: float = 0.6
    max_output: int = 1024
    chunked_prefill: bool = True
    max_batch: int = 64
    batch_slowdown: float = 0.01
    prefix_groups: int = 8
    prefix_tokens: int = 256
    prefix_share: float = 0.5  # share of requests that belong to a prefix group
    cache_hit_rate: float = 0.9
    miss_group: int | None = None  # this group stops hitting from `miss_from_s` on
    miss_from_s: float = 0.0
    kv_budget_tokens: float = 2.0e6
    pause_every_s: float = 0.0  # 0: the server never pauses
    pause_s: float = 0.0
    schedule_lag_s: float = 0.0005  # mean load-generator lateness
    disaggregated: bool = False  # prefill and decode pools: each request's KV is transferred after its first token
    kv_transfer_base_s: float = 0.002  # per transfer, on the link
    kv_transfer_s_per_token: float = 1e-6  # per prompt token, on the link
    kv_links: int = 1  # transfers the link carries at once
    itl: bool = True  # record per-token gaps (off for production-style logs)

    @property
    def duration_s(self) -> float:
        return self.requests / sum(t.rate for t in self.tenants)


@dataclass
class Simulation:
    """Per-request arrays (all of one length, in send order) and per-second server gauges."""

    settings: SimSettings
    columns: dict[str, np.ndarray]
    itl_offsets: np.ndarray | None  # request i's gaps are itl_values[off[i]:off[i+1]]
    itl_values: np.ndarray | None
    scrape_t: np.ndarray
    gauges: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["sent_at"])


def simulate(s: SimSettings) -> Simulation:
    rng = np.random.default_rng(s.seed)
    duration = s.duration_s
    sched, tenant = _arrivals(rng, s, duration)
    n = len(sched)
    lag = rng.exponential(s.schedule_lag_s, n)
    sent = sched + lag
    order = np.argsort(sent, kind="stable")
    sched, tenant, lag, sent = sched[order], tenant[order], lag[order], sent[order]
    limited = _over_quota(s, sent, tenant)

    shares = np.array([m.share for m in s.models], dtype=np.float64)
    model = rng.choice(len(s.models), n, p=shares / shares.sum())
    step_base = np.array([m.decode_step_s for m in s.models])[model]
    prefill_rate = np.array([m.prefill_tokens_per_s for m in s.models])[model]
    prompt = np.clip(rng.lognormal(np.log(s.prompt_median), s.prompt_sigma, n), 16, 32000).astype(np.int64)
    is_long = rng.random(n) < s.long_prompt_share
    prompt[is_long] = s.long_prompt_tokens
    out = np.clip(rng.lognormal(np.log(s.output_median), s.output_sigma, n), 2, s.max_output).astype(np.int64)
    group = np.where(rng.random(n) < s.prefix_share, rng.integers(0, max(s.prefix_groups, 1), n), -1)
    hit = (group >= 0) & (rng.random(n) < s.cache_hit_rate)
    if s.miss_group is not None:
        hit &= ~((group == s.miss_group) & (sent >= s.miss_from_s))
    cached = np.where(hit, np.minimum(s.prefix_tokens, prompt - 1), 0)
    prefill = (prompt - cached) / prefill_rate + 0.005

    served = ~limited
    bins = int(np.ceil(duration / GRID_S)) + 1
    k = np.minimum((sent / GRID_S).astype(np.int64), bins - 1)
    # Fixed point: the step time depends on the batch, the batch on how long requests stay.
    running = np.zeros(bins)
    for _ in range(2):
        step = step_base * (1 + s.batch_slowdown * np.minimum(running[k], s.max_batch))
        service = prefill + out * step
        wait = _fluid_wait(k, np.where(served, service, 0.0), s.max_batch, bins)
        running = _occupancy(k, wait, service, served, bins)
    tpot = step * rng.lognormal(0, 0.05, n)

    kv = _occupancy(k, wait, service, served, bins, weight=prompt + out / 2) / s.kv_budget_tokens
    overflow = np.clip(kv - 1.0, 0, None)
    mid = np.minimum(k + ((wait + service / 2) / GRID_S).astype(np.int64), bins - 1)
    preempted = served & (rng.random(n) < np.minimum(0.9, 4 * overflow[mid]))
    recompute = np.where(preempted, (prompt + out / 2) / prefill_rate + 0.3, 0.0)

    freezes = _pauses(s, duration)
    if not s.chunked_prefill:  # a prefill of more than one step's worth monopolizes the steps it runs in
        blocking = served & (prefill > BLOCKING_PREFILL_S)
        start = sent[blocking] + wait[blocking]
        freezes = _merge(np.concatenate([freezes, np.column_stack([start, start + prefill[blocking]])]))
        prefill = np.where(blocking, 1e-6, prefill)  # its prefill is its own freeze: it ends with it
    warp = _Warp(freezes)
    start_p = warp.progress(sent) + wait
    first = warp.wall(start_p + prefill)

    transfer = np.full(n, np.nan)
    if s.disaggregated:
        size = s.kv_transfer_base_s + prompt * s.kv_transfer_s_per_token
        k_first = np.minimum(((start_p + prefill) / GRID_S).astype(np.int64), bins - 1)
        transfer = np.where(served, _fluid_wait(k_first, np.where(served, size, 0.0), s.kv_links, bins) + size, np.nan)

    itl_offsets = itl_values = None
    if s.itl:
        gaps_n = np.where(served, out - 1, 0)
        itl_offsets = np.concatenate(([0], np.cumsum(gaps_n)))
        row = np.repeat(np.arange(n), gaps_n)
        gap_p = tpot[row] * rng.lognormal(0, 0.1, len(row))
        at = rng.integers(0, np.maximum(gaps_n, 1))  # where a preempted request's recompute lands
        first_gap = itl_offsets[:-1]
        hit_rows = np.flatnonzero(preempted & (gaps_n > 0))
        gap_p[first_gap[hit_rows] + at[hit_rows]] += recompute[hit_rows]
        if s.disaggregated:  # the stream waits for its KV between the first and second tokens
            with_gaps = np.flatnonzero(served & (gaps_n > 0))
            gap_p[first_gap[with_gaps]] += transfer[with_gaps]
        token_p = start_p[row] + prefill[row] + _cumsum_within(gap_p, itl_offsets)
        token_w = warp.wall(token_p)
        prev = np.concatenate(([0.0], token_w[:-1]))
        is_first = np.zeros(len(row), bool)
        is_first[first_gap[gaps_n > 0]] = True
        prev[is_first] = first[row[is_first]]
        itl_values = token_w - prev
        end = first.copy()
        last = itl_offsets[1:] - 1
        end[gaps_n > 0] = token_w[last[gaps_n > 0]]
    else:
        end = warp.wall(start_p + prefill + (out - 1) * tpot + recompute + np.nan_to_num(transfer))

    first = np.where(served, first, np.nan)
    end = np.where(served, end, sent + 0.003)
    columns = {
        "scheduled_at": sched, "sent_at": sent, "schedule_lag_s": lag, "tenant": tenant, "model": model,
        "prompt_tokens": prompt, "output_tokens": np.where(served, out, 0), "max_tokens": np.full(n, s.max_output),
        "cached_tokens": np.where(served, cached, 0), "prefix_group": group, "first_token_at": first, "end_at": end,
        "http_status": np.where(limited, 429, 200), "preempted": preempted, "wait_s": wait,
        "kv_transfer_s": transfer,
    }
    scrape_t, gauges = _scrape(s, columns, kv, wait, preempted, bins)
    return Simulation(s, columns, itl_offsets, itl_values, scrape_t, gauges)


def _arrivals(rng: np.random.Generator, s: SimSettings, duration: float) -> tuple[np.ndarray, np.ndarray]:
    times, owners = [], []
    for i, t in enumerate(s.tenants):
        peak = t.rate * max(t.burst_factor, 1.0)
        cand = np.sort(rng.uniform(0, duration, rng.poisson(peak * duration)))
        rate = np.full(len(cand), t.rate)
        if t.burst_every_s > 0:
            rate = np.where(cand % t.burst_every_s >= t.burst_every_s - t.burst_s, peak, rate)
        keep = rng.random(len(cand)) < rate / peak
        times.append(cand[keep])
        owners.append(np.full(int(keep.sum()), i))
    return np.concatenate(times), np.concatenate(owners)


def _over_quota(s: SimSettings, sent: np.ndarray, tenant: np.ndarray) -> np.ndarray:
    """Requests beyond their tenant's quota within the same wall-clock second (sent is sorted)."""
    limited = np.zeros(len(sent), bool)
    for i, t in enumerate(s.tenants):
        if t.quota_per_s is None:
            continue
        idx = np.flatnonzero(tenant == i)
        second = np.floor(sent[idx]).astype(np.int64)
        rank = np.arange(len(idx)) - np.searchsorted(second, second, side="left")
        limited[idx[rank >= t.quota_per_s]] = True
    return limited


def _fluid_wait(k: np.ndarray, demand: np.ndarray, seats: int, bins: int) -> np.ndarray:
    """Queue wait per request: seat-seconds queued ahead of its bin / the seats (a fluid queue)."""
    work = np.bincount(k, weights=demand, minlength=bins)
    cap = seats * GRID_S
    backlog = np.zeros(bins)
    q = 0.0
    for i in range(bins):  # one pass over the grid, not over requests
        backlog[i] = q
        q = max(0.0, q + work[i] - cap)
    return backlog[k] / seats


def _occupancy(k, wait, service, served, bins, weight=None) -> np.ndarray:
    """Per grid bin: requests (or their `weight`) in service."""
    a = np.minimum(k + (wait / GRID_S).astype(np.int64), bins - 1)
    b = np.minimum(a + np.maximum((service / GRID_S).astype(np.int64), 1), bins)
    w = np.where(served, 1.0 if weight is None else weight, 0.0) * np.ones(len(k))
    diff = np.bincount(a, weights=w, minlength=bins + 1) - np.bincount(b, weights=w, minlength=bins + 1)
    return np.cumsum(diff)[:bins]


def _pauses(s: SimSettings, duration: float) -> np.ndarray:
    if s.pause_every_s <= 0 or s.pause_s <= 0:
        return np.zeros((0, 2))
    starts = np.arange(s.pause_every_s / 2, duration, s.pause_every_s)
    return np.column_stack([starts, starts + s.pause_s])


def _merge(iv: np.ndarray) -> np.ndarray:
    if len(iv) == 0:
        return iv
    iv = iv[np.argsort(iv[:, 0])]
    out = [list(iv[0])]
    for a, b in iv[1:]:
        if a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.array(out)


class _Warp:
    """Wall time <-> server progress time, given disjoint freeze intervals in wall time."""

    def __init__(self, freezes: np.ndarray) -> None:
        self.start = freezes[:, 0] if len(freezes) else np.zeros(0)
        length = (freezes[:, 1] - freezes[:, 0]) if len(freezes) else np.zeros(0)
        self.before = np.concatenate(([0.0], np.cumsum(length)))  # frozen time before freeze i
        self.p_start = self.start - self.before[:-1]  # each freeze's instant in progress time
        self.length = length

    def progress(self, wall: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.start, wall, side="right")  # freezes started at or before
        inside = np.zeros(len(wall))
        j = np.maximum(i - 1, 0)
        if len(self.start):
            inside = np.where(i > 0, np.clip(wall - self.start[j], 0, self.length[j]), 0.0)
        return wall - self.before[np.maximum(i - 1, 0)] * (i > 0) - inside

    def wall(self, progress: np.ndarray) -> np.ndarray:
        # An event at a freeze's instant happens when the freeze ends.
        return progress + self.before[np.searchsorted(self.p_start, progress, side="right")]


def _cumsum_within(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each request's first gap (per-request token times)."""
    total = np.cumsum(values)
    before = np.concatenate(([0.0], total))[offsets[:-1]]
    return total - np.repeat(before, np.diff(offsets))


def _scrape(s: SimSettings, c: dict[str, np.ndarray], kv: np.ndarray, wait: np.ndarray, preempted: np.ndarray,
            bins: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Once-a-second gauges and counters, as a Prometheus scraper would have read them."""
    served = c["http_status"] == 200
    sent, first, end = c["sent_at"][served], c["first_token_at"][served], c["end_at"][served]
    t = np.arange(0.0, float(np.nanmax(c["end_at"])) + 1.0, 1.0)
    admitted = np.sort(sent + wait[served])

    def started(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.sort(x), t, side="right").astype(np.float64)

    def cumulative(at: np.ndarray, w: np.ndarray) -> np.ndarray:
        o = np.argsort(at)
        return np.concatenate(([0.0], np.cumsum(w[o])))[np.searchsorted(at[o], t, side="right")]

    grid = np.minimum((t / GRID_S).astype(np.int64), bins - 1)
    return t, {
        "vllm:num_requests_running": started(admitted) - started(end),
        "vllm:num_requests_waiting": started(sent) - started(admitted),
        "vllm:kv_cache_usage_perc": np.clip(kv[grid], 0, 1),
        "vllm:num_preemptions_total": cumulative(first, preempted[served].astype(np.float64)),
        "vllm:prefix_cache_queries_total": cumulative(first, c["prompt_tokens"][served].astype(np.float64)),
        "vllm:prefix_cache_hits_total": cumulative(first, c["cached_tokens"][served].astype(np.float64)),
    }
