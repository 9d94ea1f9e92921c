"""The metrics of disaggregated serving, kept in each engine process's registry beside vLLM's names.

vLLM names KV-transfer figures only for its NIXL connector
(`vllm:nixl_xfer_time_seconds`, `vllm:nixl_bytes_transferred`); this engine's
transports are not NIXL, so its figures are in the `servescope:` namespace
(the analyzers read either spelling):

- `servescope:kv_transfer_seconds` (histogram, decode pool): from the
  prefill engine starting to export a request's blocks to the decode engine
  holding them in its cache, queueing in between included;
- `servescope:kv_transfer_bytes` (histogram, decode pool): bytes per transfer;
- `servescope:kv_transfer_queue_depth` (gauge, decode pool): transfers taken
  in and not yet placed (in flight, or waiting for room);
- `servescope:kv_transfer_wait_seconds` (counter, decode pool): time the
  decode loop had nothing to run but transfers on their way: decode capacity
  lost to the transfer;
- `servescope:engine_step_seconds` (histogram, both pools): each step's host
  time, so a report can set the pools' step times side by side.

Each pool's running and waiting counts are vLLM's gauges; the front end adds
the labels `pool` (prefill | decode) and `replica` when it merges the
engines' metrics (`merge.py`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from servescope.reference_engine.metrics import ENGINE_LABEL

TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(4 ** i * 1024) for i in range(1, 13))  # 4 KiB .. 16 GiB
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class PDMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, role: str) -> None:
        labels = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": ENGINE_LABEL}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry).labels(**values)

        self.step_seconds = histogram("servescope:engine_step_seconds", "Host time of each engine step.", STEP_BUCKETS)
        self.transfer_seconds = self.transfer_bytes = self.queue_depth = self.wait_seconds = None
        if role == "decode":
            self.transfer_seconds = histogram("servescope:kv_transfer_seconds",
                                              "Prefill export start to blocks placed in the decode cache.",
                                              TRANSFER_BUCKETS)
            self.transfer_bytes = histogram("servescope:kv_transfer_bytes", "KV bytes per request transferred.",
                                            BYTES_BUCKETS)
            self.queue_depth = Gauge("servescope:kv_transfer_queue_depth", "KV transfers taken in, not yet placed.",
                                     labels, registry=registry).labels(**values)
            self.wait_seconds = Counter("servescope:kv_transfer_wait_seconds",
                                        "Decode loop time with nothing to run but transfers on their way.",
                                        labels, registry=registry).labels(**values)
