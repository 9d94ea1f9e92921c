"""What every diagnosis rule reads: the measured requests with derived columns, once.

Rules are small functions of a `DiagnosisContext`; computing the derived
columns (cache hit, acceptance, largest gap, time in run) here keeps each rule
to its own logic and keeps a 100k-request diagnosis from repeating the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.client_health import client_health
from servescope.analyzers.metrics import describe_ranked
from servescope.analyzers.server_metrics import ServerMetrics
from servescope.analyzers.summary import measured_mask
from servescope.rundir.reader import RunData

# Slice ITL histograms: log bins 0.1% wide from 1 us (smaller gaps share the first bin).
ITL_BIN_RATIO = 1.001
ITL_BIN_FLOOR_S = 1e-6


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

    @cached_property
    def _itl_histogram_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Per finite inter-token gap: its run.requests row, its log bin, its value; and the bin count."""
        values = self.run.itl_values
        rows = np.repeat(np.arange(len(self.run.requests), dtype=np.int32), self.run.itl_lengths)
        finite = np.isfinite(values)
        values, rows = values[finite], rows[finite]
        bins = np.floor(np.log(np.maximum(values, ITL_BIN_FLOOR_S) / ITL_BIN_FLOOR_S) / math.log(ITL_BIN_RATIO))
        bins = bins.astype(np.int64)
        return rows, bins, values, int(bins.max()) + 1 if bins.size else 1

    def itl_by_group(self, rows: pd.Index, codes: np.ndarray, n_groups: int) -> list[dict[str, Any]]:
        """ITL distribution (`metrics.describe` form, no CI) of `rows` (frame index) per group code 0..n_groups-1.

        Slices get ITL from a log histogram of every gap (bins 0.1% wide), so
        each slice dimension costs one gather and one bincount over the gaps;
        percentiles are exact to 0.1%. Pooling and partitioning each slice's
        gaps instead walks the ten million gaps of a large run once per slice
        and took seconds per report. Counts and means are exact.
        """
        gap_rows, bins, values, n_bins = self._itl_histogram_keys
        per_request = np.full(len(self.run.requests), -1, dtype=np.int64)
        per_request[rows.to_numpy(dtype=np.int64)] = codes
        gap_groups = per_request[gap_rows] + 1  # 0: in no group
        hist = np.bincount(gap_groups * n_bins + bins, minlength=(n_groups + 1) * n_bins).reshape(n_groups + 1, n_bins)
        sums = np.bincount(gap_groups, weights=values, minlength=n_groups + 1)
        out = []
        for g in range(1, n_groups + 1):
            cumulative = np.cumsum(hist[g])
            n = int(cumulative[-1])

            def value_at(rank: int, cumulative: np.ndarray = cumulative) -> float:
                b = int(np.searchsorted(cumulative, rank, side="right"))
                return ITL_BIN_FLOOR_S * ITL_BIN_RATIO ** (b + 0.5)  # the bin's geometric middle

            out.append(describe_ranked(n, float(sums[g] / n) if n else None, value_at, with_ci=False))
        return out


def build_context(run: RunData) -> DiagnosisContext:
    mask = measured_mask(run.requests) if len(run.requests) else np.zeros(0, bool)
    frame = add_derived_columns(run.requests, run.itl_max).loc[mask]
    return DiagnosisContext(
        run=run,
        frame=frame,
        metrics=ServerMetrics.from_frame(run.server_metrics),
        client=client_health(run.run, frame, run.itl_lengths[mask]),
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
