import numpy as np
import pytest

from servescope.analyzers.charts import sample_indices
from servescope.analyzers.context import build_context
from servescope.analyzers.slices import all_slice_tables, labels, slice_table


def test_slices_by_label_cache_and_spec(make_sim):
    sim = make_sim()
    for i in range(60):
        sim.add(i * 0.1, 0.01 if i % 3 else 0.05, tenant="ab"[i % 2], prompt=400,
                cached_tokens=256 if i % 3 else 0, spec_draft_tokens=8 if i < 30 else 0, spec_accepted_tokens=6 if i < 30 else 0)
    frame = build_context(sim.run()).frame
    assert labels(frame, "cache").value_counts().to_dict() == {"hit": 40, "miss": 20}
    assert labels(frame, "cached_band").value_counts().to_dict() == {"50-75%": 40, "0%": 20}
    assert labels(frame, "spec").value_counts().to_dict() == {"on": 30, "off": 30}
    assert labels(frame, "acceptance_band").dropna().unique().tolist() == [">=60%"]
    rows = {r["value"]: r for r in slice_table(frame, "cache")}
    assert rows["miss"]["ttft_s"]["p50"] == 0.05 and rows["hit"]["ttft_s"]["p50"] == 0.01
    assert rows["miss"]["n"] == 20 and not rows["miss"]["low_n"]
    dims = {t["dimension"] for t in all_slice_tables(frame)}
    assert {"tenant", "cache", "spec", "time_window", "cached_band"} <= dims
    assert "prompt_bucket" not in dims  # one value (none): nothing to slice


def test_small_slices_are_flagged(make_sim):
    sim = make_sim()
    for i in range(25):
        sim.add(i * 0.1, 0.01, tenant="big" if i < 20 else "small")
    rows = {r["value"]: r for r in slice_table(build_context(sim.run()).frame, "tenant")}
    assert rows["small"]["low_n"] and not rows["big"]["low_n"]


def test_time_windows_cover_the_run(make_sim):
    sim = make_sim().steady(n=100)
    windows = labels(build_context(sim.run()).frame, "time_window")
    assert windows.nunique() == 10 and windows.notna().all()


def test_chart_downsampling_keeps_the_spikes():
    y = np.ones(100_000)
    y[[17, 50_001, 99_998]] = 100.0
    idx = sample_indices(y, 2500)
    assert len(idx) <= 2500 and {17, 50_001, 99_998} <= set(idx.tolist())
    assert np.array_equal(sample_indices(np.ones(10)), np.arange(10))


def test_itl_per_slice_pools_only_that_slices_gaps(make_sim):
    sim = make_sim()
    sim.add(0.0, 0.01, out=3, gaps=[0.5, 0.5], tenant="warmup-only", phase="warmup")  # excluded from slices
    for i in range(40):
        stall = i % 2 == 0
        sim.add(0.1 + i * 0.1, 0.01, out=5, gaps=[0.2, 0.01, 0.01, 0.01] if stall else [0.02] * 4,
                tenant="stalled" if stall else "smooth")
    ctx = build_context(sim.run())
    rows = {r["value"]: r for r in slice_table(ctx.frame, "tenant", ctx.itl_by_group)}
    assert set(rows) == {"stalled", "smooth"}
    stalled, smooth = rows["stalled"]["itl_s"], rows["smooth"]["itl_s"]
    assert stalled["n"] == 80 and stalled["p99"] == pytest.approx(0.2, rel=1e-3)  # histogram bins: 0.1%
    assert stalled["p50"] == pytest.approx(0.01, rel=1e-3) and stalled["mean"] == pytest.approx(0.0575)
    assert smooth["n"] == 80 and smooth["p99"] == pytest.approx(0.02, rel=1e-3)
    assert slice_table(ctx.frame, "tenant")[0]["itl_s"]["n"] == 0  # without the gaps: an empty distribution
