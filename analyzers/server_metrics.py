"""Server metrics scraped from Prometheus: one vocabulary for vLLM, SGLang, the reference engine and telemetry.

`ServerMetrics` renames every known series to a short canonical key (the
tables below are the only place that knows engine and exporter spellings) and
answers the three questions analyzers ask: a gauge over time, a counter's rate
over time (reset-safe deltas), and a histogram's quantile from bucket deltas.

A run may scrape several endpoints (the engine, NVIDIA's DCGM exporter,
node-exporter); each sample keeps its `source`. Series of one source are
combined at its own scrape times, and sources are combined on the union of
their times with each one's last value carried forward, so two scrapers that
never sample at the same instant still add up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

# canonical key -> (kind, vLLM / reference-engine names, SGLang names).
# vLLM declares counters without `_total`; prometheus_client adds it on export, so both appear.
METRIC_NAMES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "running": ("gauge", ("vllm:num_requests_running",), ("sglang:num_running_reqs",)),
    "waiting": ("gauge", ("vllm:num_requests_waiting",), ("sglang:num_queue_reqs",)),
    "kv_usage": ("gauge", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), ("sglang:token_usage",)),
    "preemptions": ("counter", ("vllm:num_preemptions_total", "vllm:num_preemptions"), ("sglang:num_retracted_reqs",)),
    "prefix_queries": ("counter", ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"), ()),
    "prefix_hits": ("counter", ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"), ()),
    "prefix_hit_rate": ("gauge", (), ("sglang:cache_hit_rate",)),
    "cached_tokens": ("counter", (), ("sglang:cached_tokens_total",)),
    "spec_draft": ("counter", ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_draft_tokens"), ()),
    "spec_accepted": ("counter", ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens"), ()),
    "spec_accept_rate": ("gauge", (), ("sglang:spec_accept_rate",)),
    "spec_accept_length": ("gauge", (), ("sglang:spec_accept_length",)),
    "prompt_tokens": ("counter", ("vllm:prompt_tokens_total", "vllm:prompt_tokens"), ("sglang:prompt_tokens_total",)),
    "generation_tokens": ("counter", ("vllm:generation_tokens_total", "vllm:generation_tokens"), ("sglang:generation_tokens_total",)),
    "ttft_hist": ("histogram", ("vllm:time_to_first_token_seconds",), ("sglang:time_to_first_token_seconds",)),
    "itl_hist": ("histogram", ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"), ("sglang:inter_token_latency_seconds",)),
    "e2e_hist": ("histogram", ("vllm:e2e_request_latency_seconds",), ("sglang:e2e_request_latency_seconds",)),
    "queue_hist": ("histogram", ("vllm:request_queue_time_seconds",), ("sglang:queue_time_seconds",)),
    # Disaggregated prefill/decode: vLLM names transfer figures only for its NIXL connector.
    "kv_transfer_hist": ("histogram", ("servescope:kv_transfer_seconds", "vllm:nixl_xfer_time_seconds"), ()),
    "kv_transfer_bytes_hist": ("histogram", ("servescope:kv_transfer_bytes", "vllm:nixl_bytes_transferred"), ()),
    "kv_transfer_queue": ("gauge", ("servescope:kv_transfer_queue_depth",), ()),
    "kv_transfer_wait": ("counter", ("servescope:kv_transfer_wait_seconds_total", "servescope:kv_transfer_wait_seconds"), ()),
    "step_hist": ("histogram", ("servescope:engine_step_seconds",), ()),
}
# GPU and host telemetry: canonical key -> (kind, ((exporter name, scale to the key's unit), ...)).
# Units: percent, bytes, watts, joules, MHz. DCGM exporter names (dcgm-exporter's default counters),
# node-exporter's, and the reference engine's own (`servescope:`, read through torch).
TELEMETRY_NAMES: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "gpu_util": ("gauge", (("DCGM_FI_DEV_GPU_UTIL", 1.0), ("servescope:gpu_utilization_perc", 1.0))),
    "gpu_mem_used": ("gauge", (("DCGM_FI_DEV_FB_USED", 2.0**20), ("servescope:gpu_memory_used_bytes", 1.0))),
    "gpu_mem_total": ("gauge", (("servescope:gpu_memory_total_bytes", 1.0),)),
    "gpu_power": ("gauge", (("DCGM_FI_DEV_POWER_USAGE", 1.0), ("servescope:gpu_power_watts", 1.0))),
    "gpu_energy": ("counter", (("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1e-3),)),  # mJ
    "gpu_sm_clock": ("gauge", (("DCGM_FI_DEV_SM_CLOCK", 1.0),)),
    "gpu_mem_bw_util": ("gauge", (("DCGM_FI_DEV_MEM_COPY_UTIL", 1.0), ("DCGM_FI_PROF_DRAM_ACTIVE", 100.0))),
    "host_cpu_seconds": ("counter", (("node_cpu_seconds_total", 1.0),)),  # per cpu and mode
    "net_rx_bytes": ("counter", (("node_network_receive_bytes_total", 1.0),)),
    "net_tx_bytes": ("counter", (("node_network_transmit_bytes_total", 1.0),)),
}
# Gauges that are fractions or per-device rates are averaged across engines and GPUs; counts and
# amounts (requests, bytes, watts) are summed.
_AVERAGED = {"kv_usage", "prefix_hit_rate", "spec_accept_rate", "spec_accept_length", "gpu_util", "gpu_sm_clock",
             "gpu_mem_bw_util"}


def _name_table() -> dict[str, tuple[str, str, float]]:
    """Exact scraped sample name -> (canonical key, histogram part or "", scale to the key's unit)."""
    table: dict[str, tuple[str, str, float]] = {}
    for key, (kind, vllm, sglang) in METRIC_NAMES.items():
        for name in vllm + sglang:
            if kind == "histogram":
                for part in ("_bucket", "_sum", "_count"):
                    table[name + part] = (key, part, 1.0)
            else:
                table[name] = (key, "", 1.0)
    for key, (_, names) in TELEMETRY_NAMES.items():
        for name, scale in names:
            table[name] = (key, "", scale)
    return table


_NAMES = _name_table()


def is_averaged(key: str) -> bool:
    """Whether `key` is combined across label sets and sources by its mean (fractions) rather than its sum."""
    return key in _AVERAGED


def canonical_name(name: str) -> tuple[str, str, float] | None:
    """(canonical key, histogram part, scale) of a scraped sample name; None for a series no analyzer reads."""
    return _NAMES.get(name)


@dataclass
class ServerMetrics:
    """Canonicalized samples: columns t, key, part, labels, value (in the key's unit), source ("" when unknown)."""

    samples: pd.DataFrame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "ServerMetrics":
        columns = ["t", "key", "part", "labels", "value", "source"]
        if frame.empty:
            return cls(pd.DataFrame(columns=columns))
        mapped = frame["name"].map(_NAMES)
        keep = mapped.notna()
        sub = frame.loc[keep].copy()
        sub["key"] = [m[0] for m in mapped[keep]]
        sub["part"] = [m[1] for m in mapped[keep]]
        sub["value"] = sub["value"].to_numpy(dtype=np.float64) * np.array([m[2] for m in mapped[keep]], dtype=np.float64)
        sub["source"] = sub["source"].fillna("").astype(str) if "source" in sub else ""
        return cls(sub[columns].reset_index(drop=True))

    def has(self, key: str) -> bool:
        return bool((self.samples["key"] == key).any()) if len(self.samples) else False

    def sources(self, key: str) -> list[str]:
        """The endpoints that reported `key`, in the order first seen."""
        sub = self.samples[self.samples["key"] == key]
        return [str(s) for s in sub["source"].unique()]

    def gauge(self, key: str, source: str | None = None) -> pd.Series:
        """The gauge over time (indexed by t), summed (or averaged for fractions) across label sets and sources."""
        sub = self.samples[(self.samples["key"] == key) & (self.samples["part"] == "")]
        if source is not None:
            sub = sub[sub["source"] == source]
        if sub.empty:
            return pd.Series(dtype=float)
        per_source = []
        for _, part in sub.groupby("source", sort=False):
            grouped = part.groupby("t")["value"]
            per_source.append((grouped.mean() if key in _AVERAGED else grouped.sum()).sort_index())
        if len(per_source) == 1:
            return per_source[0]
        joined = pd.concat(per_source, axis=1).sort_index().ffill()
        return joined.mean(axis=1) if key in _AVERAGED else joined.sum(axis=1, min_count=1)

    def counter_total(self, key: str, where: dict[str, str] | None = None) -> pd.Series:
        """Cumulative increase since the first scrape (reset-safe), summed across label sets and sources.

        `where` keeps only the series whose labels carry those values (node-exporter's `mode="idle"`).
        """
        sub = self.samples[(self.samples["key"] == key) & (self.samples["part"] == "")]
        if where:
            labels = [json.loads(text) for text in sub["labels"]]
            sub = sub[np.array([all(lab.get(k) == v for k, v in where.items()) for lab in labels], dtype=bool)]
        if sub.empty:
            return pd.Series(dtype=float)
        parts = []
        for _, series in sub.groupby(["source", "labels"]):
            values = series.sort_values("t").set_index("t")["value"]
            delta = values.diff().fillna(0.0)
            delta[delta < 0] = values[delta < 0]  # a counter reset: the new value is the increase
            parts.append(delta.cumsum())
        return pd.concat(parts, axis=1).sort_index().ffill().fillna(0.0).sum(axis=1)

    def counter_rate(self, key: str) -> pd.Series:
        """Increase per second between successive scrapes (indexed by the later scrape's t)."""
        total = self.counter_total(key)
        if len(total) < 2:
            return pd.Series(dtype=float)
        dt = np.diff(total.index.to_numpy(dtype=float))
        rate = np.diff(total.to_numpy()) / np.where(dt > 0, dt, np.nan)
        return pd.Series(rate, index=total.index[1:])

    def counter_increase(self, key: str, t0: float | None = None, t1: float | None = None) -> float:
        window = self._counter_in(key, t0, t1)
        return float(window.iloc[-1] - window.iloc[0]) if len(window) > 1 else 0.0

    def _counter_in(self, key: str, t0: float | None, t1: float | None) -> pd.Series:
        """The counter's running total at the scrapes inside [t0, t1] (None: unbounded)."""
        total = self.counter_total(key)
        return total[(total.index >= (t0 if t0 is not None else -np.inf)) & (total.index <= (t1 if t1 is not None else np.inf))]

    def counter_rate_in(self, key: str, t0: float | None = None, t1: float | None = None) -> float | None:
        """Mean increase per second over [t0, t1]: between the first and last scrapes inside it, over
        their own span (the increase between two scrapes divided by the whole window understated
        every rate by up to two scrape intervals of the window). None with fewer than two scrapes."""
        window = self._counter_in(key, t0, t1)
        if len(window) < 2:
            return None
        span = float(window.index[-1] - window.index[0])
        return float(window.iloc[-1] - window.iloc[0]) / span if span > 0 else None

    def histogram_quantile(self, key: str, q: float, t0: float | None = None, t1: float | None = None) -> float | None:
        """q-quantile of observations made between t0 and t1, from bucket count deltas (linear within a bucket).

        With no t0, everything observed up to t1 counts (the counters start with the server).
        Linear interpolation inside a wide bucket can overstate a quantile badly (vLLM's
        queue-time histogram starts at 0.3 s: microsecond queues read as 150 ms), so the
        estimate is capped by Markov's inequality on the window's own mean (from _sum and
        _count): for latencies, which are never negative, the q-quantile is at most mean / (1 - q).
        """
        sub = self.samples[(self.samples["key"] == key) & (self.samples["part"] == "_bucket")]
        if sub.empty:
            return None
        les = sub["labels"].map(lambda text: json.loads(text).get("le"))
        sub = sub.assign(le=pd.to_numeric(les.replace({"+Inf": "inf"}), errors="coerce")).dropna(subset=["le"])
        counts = None
        for _, part in sub.groupby("source", sort=False):  # each endpoint's own scrapes bracket the window
            first, last = self._bracket(part, t0, t1)
            mine = part[part["t"] == last].groupby("le")["value"].sum()
            if first is not None and first < last:
                mine = mine - part[part["t"] == first].groupby("le")["value"].sum().reindex(mine.index, fill_value=0)
            counts = mine if counts is None else counts.add(mine, fill_value=0)
        if counts is None:
            return None
        counts = counts.sort_index()
        total = counts.iloc[-1] if len(counts) else 0
        if total <= 0:
            return None
        target = q * total
        bounds, cum = counts.index.to_numpy(), counts.to_numpy()
        i = int(np.searchsorted(cum, target))
        i = min(i, len(cum) - 1)
        upper = bounds[i]
        if not np.isfinite(upper):
            estimate = float(bounds[i - 1]) if i > 0 else None  # above the largest finite bucket
        else:
            lower = bounds[i - 1] if i > 0 else 0.0
            below = cum[i - 1] if i > 0 else 0.0
            in_bucket = cum[i] - below
            estimate = float(lower + (upper - lower) * ((target - below) / in_bucket if in_bucket > 0 else 1.0))
        mean = self.histogram_mean(key, t0, t1)
        if mean is not None and q < 1 and (estimate is None or estimate > mean / (1 - q)):
            estimate = mean / (1 - q)
        return estimate

    def histogram_mean(self, key: str, t0: float | None = None, t1: float | None = None) -> float | None:
        """Mean of the observations made between t0 and t1, from the _sum and _count deltas (None without them)."""
        sums = self.samples[(self.samples["key"] == key) & (self.samples["part"] == "_sum")]
        counts = self.samples[(self.samples["key"] == key) & (self.samples["part"] == "_count")]
        if sums.empty or counts.empty:
            return None
        n = total = 0.0
        for source, source_counts in counts.groupby("source", sort=False):
            first, last = self._bracket(source_counts, t0, t1)

            def delta(part: pd.DataFrame) -> float:
                value = float(part.loc[part["t"] == last, "value"].sum())
                return value - float(part.loc[part["t"] == first, "value"].sum()) if first is not None and first < last else value

            n += delta(source_counts)
            total += delta(sums[sums["source"] == source])
        return total / n if n > 0 and total >= 0 else None

    @staticmethod
    def _bracket(sub: pd.DataFrame, t0: float | None, t1: float | None) -> tuple[float | None, float]:
        """The scrapes just outside [t0, t1], so no observation inside the window is lost (first: None = from the start)."""
        times = np.sort(sub["t"].unique())
        last = times[np.searchsorted(times, t1, side="left")] if t1 is not None and t1 <= times[-1] else times[-1]
        first = times[np.searchsorted(times, t0, side="right") - 1] if t0 is not None and t0 >= times[0] else None
        return first, last


def server_view(frame: pd.DataFrame, t0: float | None, t1: float | None) -> dict | None:
    """What the server itself reports over [t0, t1]: counter rates and histogram percentiles.

    None when nothing was scraped. Comparing it with the client's numbers shows
    time spent outside the engine (network, proxies, the client itself).
    """
    metrics = ServerMetrics.from_frame(frame)
    if metrics.samples.empty:
        return None
    rates = {}
    for key in ("prompt_tokens", "generation_tokens", "preemptions"):
        rate = metrics.counter_rate_in(key, t0, t1) if metrics.has(key) else None
        if rate is not None:
            rates[f"{key}_per_s"] = rate
    view: dict = {"rates": rates, "histograms": {}, "gauges": {}}
    queries = metrics.counter_increase("prefix_queries", t0, t1)
    if queries > 0:
        view["prefix_cache_hit_rate"] = metrics.counter_increase("prefix_hits", t0, t1) / queries
    drafted = metrics.counter_increase("spec_draft", t0, t1)
    if drafted > 0:
        view["spec_acceptance_rate"] = metrics.counter_increase("spec_accepted", t0, t1) / drafted
    for key in ("ttft_hist", "itl_hist", "e2e_hist", "queue_hist"):
        p50 = metrics.histogram_quantile(key, 0.5, t0, t1)
        if p50 is not None:
            view["histograms"][key.removesuffix("_hist")] = {
                "mean": metrics.histogram_mean(key, t0, t1), "p50": p50,
                "p90": metrics.histogram_quantile(key, 0.9, t0, t1), "p99": metrics.histogram_quantile(key, 0.99, t0, t1)}
    for key in ("running", "waiting", "kv_usage"):
        series = metrics.gauge(key)
        if t0 is not None and t1 is not None:
            series = series[(series.index >= t0) & (series.index <= t1)]
        if len(series):
            view["gauges"][key] = {"mean": float(series.mean()), "max": float(series.max())}
    return view
