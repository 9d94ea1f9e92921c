"""What every diagnosis rule reads: the measured requests with derived columns, once.

Rules are small functions of a `DiagnosisContext`; computing the derived
columns (cache hit, acceptance, largest gap, time in run) here keeps each rule
to its own logic and keeps a 100k-request diagnosis from repeating the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from analyzers.client_health import client_health
from analyzers.rundata import RunData
from analyzers.server_metrics import ServerMetrics
from analyzers.summary import measured_mask


@dataclass
class DiagnosisContext:
    """One run prepared for the rules; build it with `build_context(run)`."""

    run: RunData
    frame: pd.DataFrame  # measured (non-warmup) requests with derived columns
    metrics: ServerMetrics
    client: dict[str, Any] = field(default_factory=dict)
    frame_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # measured rows of run.requests

    @cached_property
    def ok(self) -> pd.DataFrame:
        """The successful measured requests (every latency rule's population)."""
        return self.frame[self.frame["status"] == "ok"]

    def itl_of(self, rows: pd.Index) -> np.ndarray:
        """Every inter-token gap of the given rows of `frame` (its index is run.requests' row number)."""
        mask = np.zeros(len(self.run.requests), dtype=bool)
        mask[rows.to_numpy(dtype=np.int64)] = True
        return self.run.pooled_itl(mask)


def build_context(run: RunData) -> DiagnosisContext:
    mask = measured_mask(run.requests) if len(run.requests) else np.zeros(0, bool)
    frame = add_derived_columns(run.requests, run.itl_max).loc[mask]
    return DiagnosisContext(
        run=run,
        frame=frame,
        metrics=ServerMetrics.from_frame(run.server_metrics),
        client=client_health(run.run, frame),
        frame_mask=mask,
    )


def add_derived_columns(requests: pd.DataFrame, itl_max: np.ndarray) -> pd.DataFrame:
    """Columns the slices and rules share: cache_hit, cached_fraction, spec_on, acceptance, itl_max_s."""
    frame = requests.copy()
    cached = frame["cached_tokens"].to_numpy(dtype=np.float64)
    prompt = frame["prompt_tokens"].to_numpy(dtype=np.float64)
    frame["cache_hit"] = np.where(np.isnan(cached), None, np.where(cached > 0, "hit", "miss"))
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["cached_fraction"] = np.where(prompt > 0, cached / prompt, np.nan)
        draft = frame["spec_draft_tokens"].to_numpy(dtype=np.float64)
        accepted = frame["spec_accepted_tokens"].to_numpy(dtype=np.float64)
        frame["acceptance"] = np.where(draft > 0, accepted / draft, np.nan)
    frame["spec_on"] = np.where(np.isnan(draft), None, np.where(draft > 0, "on", "off"))
    frame["itl_max_s"] = itl_max
    return frame
