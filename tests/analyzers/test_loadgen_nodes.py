"""Load-generator health per node and per worker, lost workers, and latency from the scheduled time."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from servescope.analyzers.context import build_context
from servescope.analyzers.from_scheduled import open_loop_mask
from servescope.analyzers.report import build_report
from servescope.analyzers.rules import run_rules
from servescope.analyzers.summary import summarize
from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run
from servescope.rundir.writer import write_run_dir
from support.cluster_runs import LOST, NODE_A, NODE_B, cluster_sim, falling_behind_sim, lost_worker_sim, ray_meta


# -- per-node health ------------------------------------------------------------------------

def test_health_per_node_and_worker_with_clocks(make_sim):
    sim = cluster_sim(make_sim, lag_b=0.0005)
    client = summarize(sim.run(**ray_meta()))["client"]
    assert [n["node"] for n in client["nodes"]] == [NODE_A, NODE_B]
    a, b = client["nodes"]
    assert a["workers"] == [0, 1] and b["workers"] == [2, 3]
    assert a["requests"] == b["requests"] == 200 and a["schedule_lag_n"] == 200
    assert b["schedule_lag_p99_s"] == pytest.approx(0.0005)
    assert b["offset_s"] == 0.0123 and b["offset_uncertainty_s"] == 0.0004 and b["drift_s_per_s"] == 2e-6
    assert a["label"] == "node a1a1a1a1"
    rows = sim.rows[2::4] + sim.rows[3::4]
    span = max(r["end_at"] for r in rows) - min(r["sent_at"] for r in rows)
    assert b["chunks"] == 200 * 20  # 19 gaps and the first token per request
    assert b["chunk_rate_per_s"] == pytest.approx(200 * 20 / span)
    assert b["cpu_s"] == 4.0 and b["chunks_per_cpu_s"] == pytest.approx(200 * 20 / 4.0)  # two workers, 2 CPU-s each
    assert client["workers"][0]["chunks_per_cpu_s"] == pytest.approx(100 * 20 / 2.0)
    assert [w["worker"] for w in client["workers"]] == [0, 1, 2, 3]
    assert client["workers"][3]["node"] == NODE_B and client["workers"][3]["requests"] == 100
    assert client["client_bound"] is False and client["behind"] == []


def test_client_bound_names_the_node_that_fell_behind(make_sim):
    run = cluster_sim(make_sim, lag_b=0.030).run(**ray_meta())
    ctx = build_context(run)
    assert [u["node"] for u in ctx.client["behind"]] == [NODE_B]
    assert not ctx.client["nodes"][0]["behind"] and ctx.client["nodes"][1]["behind"]
    finding = next(f for f in run_rules(ctx) if f.rule == "client_bound")
    assert "node b2b2b2b2" in finding.title and "node a1a1a1a1" not in finding.title
    assert finding.evidence["behind"][0]["schedule_lag_p99_s"] == pytest.approx(0.030)
    assert "node b2b2b2b2: schedule lag p99 30.0 ms" in finding.summary
    names = [trace["name"] for trace in finding.chart["data"]]
    assert names == ["node a1a1a1a1", "node b2b2b2b2"]  # one lag trace per node


def test_a_stalled_worker_is_named_on_a_local_run(make_sim):
    sim = make_sim(seed=2).steady(n=200)  # workers 0 and 1, no node
    loop = [{"worker": 0, "loop_lag_p99_s": 0.001, "loop_lag_max_s": 0.002},
            {"worker": 1, "loop_lag_p99_s": 0.040, "loop_lag_max_s": 0.050}]
    client = build_context(sim.run(client_check={"loop_lag_p99_s": 0.040, "per_worker": loop})).client
    assert client["client_bound"] is True
    assert [u["label"] for u in client["behind"]] == ["worker 1"]
    assert client["nodes"][0]["label"] == "local" and client["nodes"][0]["workers"] == [0, 1]
    assert any(r.startswith("worker 1: event-loop lag p99 40.0 ms") for r in client["reasons"])


def test_too_few_sends_name_no_one(make_sim):
    sim = make_sim(seed=3).steady(n=200)
    for row in sim.rows[:10]:  # worker 2 sent only ten requests, all late: its p99 is just its slowest send
        row.update(worker=2, schedule_lag_s=0.05)
    client = summarize(sim.run())["client"]
    assert client["workers"][2]["schedule_lag_n"] == 10 and not client["workers"][2]["behind"]
    assert client["client_bound"] is True and client["behind"] == []  # the run-wide p99 still counts them


# -- lost workers -----------------------------------------------------------------------------

def test_worker_lost_is_its_own_kind_and_no_server_error(make_sim):
    sim = lost_worker_sim(make_sim)
    run = sim.run(**ray_meta(lost=LOST))
    summary = summarize(run)
    assert summary["overall"]["errors"] == {"worker_lost": 4}
    assert summary["overall"]["error_rate"] == 0.0
    assert summary["client"]["lost_workers"][0] | {"label": None} == {**LOST[0], "label": None}
    assert summary["client"]["nodes"][1]["lost_workers"][0]["worker"] == 3
    assert next(w for w in summary["client"]["workers"] if w["worker"] == 3)["lost"]["at_s"] == 7.5
    assert "errors" not in {f.rule for f in run_rules(build_context(run))}


def test_report_notes_lost_workers_in_its_header(make_sim, tmp_path):
    sim = lost_worker_sim(make_sim)
    out = write_run_dir(tmp_path / "run", {"status": "complete", **ray_meta(lost=LOST)}, sim.rows)
    html = build_report(out).read_text()
    header = html[: html.index("<nav")]
    assert "workers lost" in header and "worker 3 on node b2b2b2b2 at 7.5 s: the actor died" in header
    assert 'id="lost-workers"' in html and "worker_lost: 4" in html
    assert "Per node" in html and "12.300 ms ± 0.400 ms" in html


# -- coordinated omission ---------------------------------------------------------------------

def test_coordinated_omission_shows_both_figures(make_sim, tmp_path):
    sim = falling_behind_sim(make_sim, lag_slope=0.0005)  # the last sends leave 0.2 s late
    summary = summarize(sim.run())
    block = summary["overall"]["from_scheduled"]
    assert block["differs"] is True and "TTFT p99 from the scheduled time" in block["reasons"][0]
    sent_p99 = summary["overall"]["metrics"]["ttft_s"]["p99"]
    assert sent_p99 < 0.06 and block["metrics"]["ttft_s"]["p99"] > 0.2
    assert block["metrics"]["ttft_s"]["n"] == 400 and "e2e_s" in block["metrics"]
    assert summary["phases"][0]["from_scheduled"]["differs"] is True
    html = build_report(write_run_dir(tmp_path / "run", {"status": "complete"}, sim.rows)).read_text()
    assert "coordinated omission" in html and "TTFT from scheduled send" in html and "sched." in html


def test_without_coordinated_omission_one_figure(make_sim, tmp_path):
    sim = falling_behind_sim(make_sim, lag_slope=0.0)
    block = summarize(sim.run())["overall"]["from_scheduled"]
    assert block["differs"] is False and block["reasons"] == []
    html = build_report(write_run_dir(tmp_path / "run", {"status": "complete"}, sim.rows)).read_text()
    assert "from scheduled send" not in html and "coordinated omission" not in html


def test_a_small_gap_is_not_material(make_sim):
    sim = falling_behind_sim(make_sim, lag_slope=0.000005)  # at most 2 ms late against 50 ms TTFTs
    assert summarize(sim.run())["overall"]["from_scheduled"]["differs"] is False


def test_closed_loop_phases_have_no_from_scheduled_block(make_sim):
    sim = falling_behind_sim(make_sim, lag_slope=0.0005)
    for row in sim.rows:
        row["phase"] = "concurrency=8"
    summary = summarize(sim.run(phases=[{"phase": "concurrency=8", "kind": "concurrency", "concurrency": 8}]))
    assert "from_scheduled" not in summary["overall"] and "from_scheduled" not in summary["phases"][0]


# -- older run directories --------------------------------------------------------------------

def test_a_run_directory_without_the_new_columns_reads_fine(tmp_path):
    out = write_synthetic_run(tmp_path / "run", SyntheticSpec(requests=300, seed=4))
    table = pq.read_table(out / "requests.parquet")
    pq.write_table(table.drop_columns(["node", "ttft_from_scheduled_s", "e2e_from_scheduled_s"]), out / "requests.parquet")
    meta = json.loads((out / "run.json").read_text())
    assert "ray" not in meta and "lost_workers" not in meta
    build_report(out)
    summary = json.loads((out / "summary.json").read_text())
    client = summary["client"]
    assert [n["label"] for n in client["nodes"]] == ["local"] and client["lost_workers"] == []
    assert len(client["workers"]) == 4 and client["client_bound"] is False
    # Derived from scheduled_at on the same clock; the synthetic generator is never late enough to matter.
    block = summary["overall"]["from_scheduled"]
    assert block["differs"] is False and block["metrics"]["ttft_s"]["n"] == summary["overall"]["metrics"]["ttft_s"]["n"]
    sent = table.column("sent_at").to_numpy() - table.column("scheduled_at").to_numpy()
    assert np.all(sent >= 0)


def test_when_every_worker_fell_behind_none_is_singled_out(make_sim):
    sim = make_sim(seed=6).steady(n=200)
    for row in sim.rows:
        row["schedule_lag_s"] = 0.05
    client = summarize(sim.run())["client"]
    assert client["client_bound"] is True and all(w["behind"] for w in client["workers"])
    assert client["behind"] == [] and client["reasons"] == ["schedule lag p99 50.0 ms > 10.0 ms"]


@pytest.mark.parametrize("meta, phase, expected", [
    ({"load": {"kind": "concurrency", "phases": [{"phase": "p", "kind": "rate"}]}}, "p", True),  # the phase's own kind
    ({"phases": [{"phase": "p", "kind": "concurrency"}]}, "p", False),
    ({"load": {"kind": "trace"}}, "p", True),
    ({}, "rate=8.0", True),  # nothing recorded: the phase label tells
    ({}, "concurrency=8", False),
])
def test_open_loop_is_read_from_run_json_then_the_label(make_sim, meta, phase, expected):
    sim = make_sim().steady(n=5, phase=phase)
    assert open_loop_mask(meta, sim.run().requests).tolist() == [expected] * 5
