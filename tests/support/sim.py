"""Builders of small, exactly known request tables for the analyzer tests.

`Sim` lays requests out on a timeline the way a server would (send, first
token, evenly spaced tokens) so each test states its scenario in a few lines
and knows the right answer. The rules are unit-tested on these; the lab tests
run them on real engine runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from servescope.rundir.reader import RunData, requests_from_records


@dataclass
class Sim:
    seed: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def add(self, sent: float, ttft: float, out: int = 20, tpot: float = 0.01, *, prompt: int = 100,
            status: str = "ok", gaps: list[float] | None = None, **extra: Any) -> dict[str, Any]:
        i = len(self.rows)
        row: dict[str, Any] = {
            "request_id": f"r{i}", "worker": i % 2, "phase": "rate=10", "api": "completions",
            "prompt_tokens": prompt, "max_tokens": out, "scheduled_at": sent, "sent_at": sent,
            "schedule_lag_s": 0.0005, "status": status, "output_tokens_source": "usage",
        }
        if status == "ok":
            gaps = list(gaps) if gaps is not None else [tpot] * (out - 1)
            first = sent + ttft
            end = first + sum(gaps)
            row.update(first_token_at=first, end_at=end, ttft_s=ttft, e2e_s=end - sent,
                       tpot_s=(end - first) / (out - 1) if out > 1 else None, itl_s=gaps,
                       chunk_tokens=[1] * len(gaps), output_tokens=out)
        else:
            row.update(end_at=sent + ttft, error_kind=extra.pop("error_kind", "http_5xx"), http_status=503,
                       error_message="server busy")
        row.update(extra)
        self.rows.append(row)
        return row

    def steady(self, n: int = 300, rate: float = 10.0, ttft: float = 0.02, **kw: Any) -> "Sim":
        """A healthy open-loop run: Poisson sends, TTFT with 10% noise, nothing wrong."""
        t = 0.0
        for _ in range(n):
            t += self.rng.exponential(1 / rate)
            self.add(t, ttft * self.rng.uniform(0.9, 1.1), **kw)
        return self

    def metric(self, t: float, name: str, value: float, **labels: str) -> None:
        self.metrics.append({"t": t, "name": name, "labels": json.dumps(labels, sort_keys=True), "value": value})

    def run(self, **run_json: Any) -> RunData:
        frame = requests_from_records(self.rows)
        metrics = pd.DataFrame(self.metrics, columns=["t", "name", "labels", "value"])
        return RunData(run={"status": "complete", **run_json}, requests=frame, server_metrics=metrics)
