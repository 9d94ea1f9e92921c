"""Prometheus metrics under vLLM's names, so one servescope report reads vLLM and this engine alike.

What vLLM has no name for is in the engine's own namespace: `servescope:rank_step_seconds`, each
tensor-parallel rank's step time (label `rank`), so a report can show a straggler rank.

Counters are declared without `_total` (prometheus_client appends it on
export, as vLLM's do) and every series carries `model_name` and `engine`
labels. Prefix-cache queries and hits are counted in tokens, as vLLM does.
The step loop calls `on_step` after each step, in whichever thread or process
runs it; the registry lives there too. In thread mode the HTTP thread reads it
(`render`; prometheus_client's values are thread-safe), in process mode the
HTTP process asks the engine process for the rendered text.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from servescope.reference_engine.gpu_metrics import GpuCollector

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine, StepOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # as vLLM does: `*_created` series only double what a scraper stores
ENGINE_LABEL = "servescope-reference"

# vLLM's buckets, trimmed: seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": ENGINE_LABEL}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(**values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(**values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(**values)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (recompute) since start.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.spec_draft = counter("vllm:spec_decode_num_draft_tokens", "Speculative draft tokens proposed.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Gap between a request's token steps.",
                             _ITL_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduling.",
                                    _LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        r.register(GpuCollector(values))  # servescope:gpu_* where torch can read them (gpu_metrics.py)
        self._last: dict[str, int] = {}
        self._engine: LLMEngine | None = None
        r.register(_RankStepCollector(self, values))

    def _advance(self, counter: Counter, key: str, total: int) -> None:
        """Counters follow the engine's running totals (the engine keeps plain ints; this adds the delta)."""
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = total

    def on_step(self, engine: LLMEngine, outputs: list[StepOutput], step_s: float) -> None:
        self._engine = engine
        sched, bm = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(bm.usage)
        self._advance(self.preemptions, "preemptions", sched.num_preemptions)
        self._advance(self.prefix_queries, "prefix_queries", bm.prefix_queries)
        self._advance(self.prefix_hits, "prefix_hits", bm.prefix_hits)
        self._advance(self.spec_draft, "spec_draft", sched.spec_draft_tokens)
        self._advance(self.spec_accepted, "spec_accepted", sched.spec_accepted_tokens)
        self._advance(self.prompt_tokens, "prompt_tokens", engine.prompt_tokens_total)
        self._advance(self.generation_tokens, "generation_tokens", engine.generation_tokens_total)
        now = time.perf_counter()
        for out in outputs:
            seq = out.seq
            if out.first and seq.first_token_time is not None:
                self.ttft.observe(seq.first_token_time - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    self.queue_time.observe(seq.first_scheduled_time - seq.arrival_time)
            elif seq.last_token_gap is not None:
                self.itl.observe(seq.last_token_gap)
            if out.finished:
                self.e2e.observe(now - seq.arrival_time)

    def refresh_idle(self, engine: LLMEngine) -> None:
        """Gauges after an abort or while idle (no step ran to update them)."""
        self._engine = engine
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_usage.set(engine.block_manager.usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RankStepCollector:
    """`servescope:rank_step_seconds{rank}`: histograms kept by each rank (tp_workers.StepTimer), read
    at scrape time; nothing without tensor parallelism."""

    NAME = "servescope:rank_step_seconds"

    def __init__(self, metrics: EngineMetrics, labels: dict[str, str]) -> None:
        self.metrics = metrics
        self.labels = labels

    def describe(self) -> list:
        return []  # values appear only under tensor parallelism: nothing to check at registration

    def collect(self):
        from servescope.reference_engine.tp_workers import STEP_BUCKETS

        engine = self.metrics._engine
        stats = engine.rank_step_stats() if engine is not None else {}
        if not stats:
            return
        family = HistogramMetricFamily(self.NAME, "Step time of each tensor-parallel rank (device time on a GPU).",
                                       labels=[*self.labels, "rank"])
        for rank, st in sorted(stats.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(STEP_BUCKETS, st.buckets):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", st.count))
            family.add_metric([*self.labels.values(), str(rank)], buckets, st.total_s)
        yield family
