"""Run tables of a load generator spread over two Ray nodes, for the per-node health and report tests.

Built on `support.sim.Sim`: rows laid out exactly, so each test knows the right
per-node figures. Node B is the one made to lag or to lose a worker.
"""

from __future__ import annotations

NODE_A = "a1" * 28  # Ray node ids: 56 hex digits
NODE_B = "b2" * 28


def ray_meta(per_worker_loop=None, lost=None):
    """run.json of a two-node Ray run: workers 0, 1 on node A, 2, 3 on node B."""
    return {
        "phases": [{"phase": "rate=20", "kind": "rate", "rate": 20.0}],
        "ray": {"address": "auto", "workers": 4, "cpus": 8, "spare_cpus": 6, "nodes": [
            {"node": NODE_A, "offset_s": 0.0, "uncertainty_s": 0.00002, "drift_s_per_s": 0.0, "measurements": 9,
             "workers": [0, 1]},
            {"node": NODE_B, "offset_s": 0.0123, "uncertainty_s": 0.0004, "drift_s_per_s": 2e-6, "measurements": 9,
             "workers": [2, 3]}]},
        "client_check": {"loop_lag_max_s": 0.003, "loop_lag_p99_s": 0.001, "per_worker": per_worker_loop or [
            {"worker": w, "loop_lag_max_s": 0.003, "loop_lag_p99_s": 0.001, "samples": 100, "cpu_s": 2.0}
            for w in range(4)]},
        "lost_workers": lost or [],
    }


def cluster_sim(make_sim, lag_b: float, n: int = 400):
    """Open-loop rows over four workers on two nodes; node B's sends leave `lag_b` late."""
    sim = make_sim(seed=5)
    t = 0.0
    for i in range(n):
        t += sim.rng.exponential(1 / 20)
        worker = i % 4
        node = NODE_A if worker < 2 else NODE_B
        lag = lag_b if node == NODE_B else 0.0005
        ttft = 0.02 * sim.rng.uniform(0.9, 1.1)
        row = sim.add(t, ttft, out=20, worker=worker, node=node, phase="rate=20", scheduled_at=t - lag,
                      schedule_lag_s=lag)
        row.update(ttft_from_scheduled_s=ttft + lag, e2e_from_scheduled_s=row["e2e_s"] + lag)
    return sim


LOST = [{"worker": 3, "node": NODE_B, "at_s": 7.5, "reason": "the actor died: node B was killed", "in_flight_lost": 4}]


def lost_worker_sim(make_sim, lag_b: float = 0.0005):
    """Worker 3 (node B) is lost at 7.5 s with four requests in flight."""
    sim = cluster_sim(make_sim, lag_b=lag_b, n=300)
    for i in range(4):
        sim.add(7.4, 0.1, status="cancelled", worker=3, node=NODE_B, phase="rate=20", error_kind="worker_lost",
                error_message="load-generator worker 3 was lost while this request was in flight")
    return sim


def falling_behind_sim(make_sim, lag_slope: float):
    """An open-loop run whose generator sends later and later (lag grows `lag_slope` s per request)."""
    sim = make_sim(seed=8)
    t = 0.0
    for i in range(400):
        t += sim.rng.exponential(1 / 20)
        lag = 0.0005 + lag_slope * i
        ttft = 0.05 * sim.rng.uniform(0.9, 1.1)
        row = sim.add(t + lag, ttft, out=10, scheduled_at=t, schedule_lag_s=lag, phase="rate=20")
        row.update(ttft_from_scheduled_s=ttft + lag, e2e_from_scheduled_s=row["e2e_s"] + lag)
    return sim
