"""The `kv_transfer` rule and the pools of a disaggregated run, on simulated runs with a known transfer cost."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from servescope.analyzers.context import build_context
from servescope.analyzers.incidents.catalogue import INCIDENTS
from servescope.analyzers.incidents.output import write_run
from servescope.analyzers.incidents.simulator import SimSettings, simulate
from servescope.analyzers.pools import pool_labels, pool_view
from servescope.analyzers.rules.kv_transfer import kv_transfer
from servescope.analyzers.server_metrics import ServerMetrics
from servescope.analyzers.slices import slice_table
from servescope.rundir.reader import load_run


def _context(tmp_path, settings: SimSettings, name: str):
    return build_context(load_run(write_run(simulate(settings), tmp_path / name, name)))


def test_fires_with_the_handoff_stall_as_evidence(tmp_path) -> None:
    ctx = _context(tmp_path, INCIDENTS["kv_transfer"](0, 2000), "slow-link")
    finding = kv_transfer(ctx)
    assert finding is not None and finding.severity in ("medium", "high")
    ev = finding.evidence
    assert ev["n"] > 1500 and ev["kv_transfer_s"]["p50"] >= 0.06  # at least the link's fixed cost
    assert ev["handoff_gap_ratio"] > 2.0 and ev["stalled_share"] > 0.5
    assert ev["transfer_share_of_ttft"] > 0.2
    assert len(finding._affected) == ev["stalled_requests"]


def test_silent_when_transfers_are_cheap_and_when_nothing_is_transferred(tmp_path) -> None:
    cheap = SimSettings(seed=1, requests=1500, disaggregated=True, kv_transfer_base_s=0.0002, kv_transfer_s_per_token=1e-7)
    ctx = _context(tmp_path, cheap, "fast-link")
    assert np.isfinite(ctx.frame["kv_transfer_s"].to_numpy(dtype=np.float64)).sum() > 1000
    assert kv_transfer(ctx) is None
    assert kv_transfer(_context(tmp_path, SimSettings(seed=1, requests=1500), "colocated")) is None


def test_the_pool_slice_splits_handed_off_requests_from_those_done_at_the_first_token() -> None:
    frame = pd.DataFrame({"kv_transfer_s": [0.01, np.nan, 0.02, np.nan], "status": ["ok", "ok", "ok", "error"],
                          "ttft_s": [0.1, 0.2, 0.1, np.nan], "tpot_s": [0.01, np.nan, 0.02, np.nan],
                          "e2e_s": [1.0, 0.2, 1.0, np.nan]})
    assert pool_labels(frame).tolist() == ["decode", "prefill", "decode", None]
    rows = {r["value"]: r["n"] for r in slice_table(frame, "pool")}
    assert rows == {"decode": 2, "prefill": 1}
    colocated = frame.assign(kv_transfer_s=np.nan)
    assert pool_labels(colocated).isna().all()


def _samples(rows: list[tuple[float, str, dict, float]]) -> ServerMetrics:
    base = {"model_name": "tiny", "engine": "servescope-reference"}
    return ServerMetrics.from_frame(pd.DataFrame({
        "t": [r[0] for r in rows], "name": [r[1] for r in rows],
        "labels": [json.dumps({**base, **r[2]}, sort_keys=True) for r in rows],
        "value": [r[3] for r in rows], "source": ["http://127.0.0.1:1/metrics"] * len(rows)}))


def test_pool_view_sets_the_pools_side_by_side_from_both_ends() -> None:
    prefill, decode = {"pool": "prefill", "replica": "0"}, {"pool": "decode", "replica": "0"}
    rows = []
    for t in (0.0, 1.0, 2.0):
        rows += [(t, "vllm:num_requests_running", prefill, 2.0), (t, "vllm:num_requests_waiting", prefill, 3.0 * t),
                 (t, "vllm:num_requests_running", decode, 8.0), (t, "vllm:num_requests_waiting", decode, 0.0),
                 (t, "servescope:kv_transfer_wait_seconds_total", decode, 0.25 * t),
                 (t, "servescope:kv_transfer_queue_depth", decode, t)]
        for le, count in (("0.01", 5 * t), ("0.1", 10 * t), ("+Inf", 10 * t)):
            rows.append((t, "servescope:engine_step_seconds_bucket", {**decode, "le": le}, count))
        rows += [(t, "servescope:engine_step_seconds_count", decode, 10 * t),
                 (t, "servescope:engine_step_seconds_sum", decode, 0.3 * t)]
    frame = pd.DataFrame({"kv_transfer_s": [0.05] * 12 + [np.nan] * 3, "status": ["ok"] * 15,
                          "ttft_s": np.linspace(0.1, 0.5, 15), "tpot_s": [0.02] * 12 + [np.nan] * 3})
    view = {row["pool"]: row for row in pool_view(frame, _samples(rows))}
    assert view["prefill"]["running"] == {"mean": 2.0, "max": 2.0} and view["prefill"]["waiting"]["max"] == 6.0
    assert view["prefill"]["requests"] == 15 and view["decode"]["requests"] == 12
    assert view["decode"]["transfer_wait_s"] == 0.5 and view["decode"]["transfer_wait_share"] == 0.25
    assert view["decode"]["transfer_queue"]["max"] == 2.0
    assert view["decode"]["step_s"]["p50"] <= 0.01 and view["decode"]["kv_transfer_s"]["p50"] == 0.05
    assert view["prefill"]["step_s"]["p50"] is None  # the prefill pool reported no step times here
    assert pool_view(frame.assign(kv_transfer_s=np.nan), ServerMetrics.from_frame(pd.DataFrame(
        columns=["t", "name", "labels", "value", "source"]))) is None
