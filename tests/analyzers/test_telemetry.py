"""GPU and host telemetry: DCGM and node-exporter names, several sources, energy per output token."""

import json

import numpy as np
import pandas as pd
import pytest

from servescope.analyzers.server_metrics import ServerMetrics
from servescope.analyzers.telemetry import (
    energy_joules,
    gpu_over_time,
    host_cpu_busy,
    network_rate,
    telemetry_summary,
)

DCGM = "http://gpu-node:9400/metrics"
NODE = "http://gpu-node:9100/metrics"
ENGINE = "http://127.0.0.1:8000/metrics"


def _row(t, name, value, source, **labels):
    return {"t": float(t), "name": name, "labels": json.dumps(labels, sort_keys=True), "value": float(value),
            "source": source}


def _two_gpus(seconds=11, power=(300.0, 100.0), energy=True):
    rows = []
    for s in range(seconds):
        t = s + 0.3  # the exporter scrapes at its own instants, not the engine's
        for gpu, watts in enumerate(power):
            rows += [_row(t, "DCGM_FI_DEV_GPU_UTIL", 80 + 10 * gpu, DCGM, gpu=str(gpu)),
                     _row(t, "DCGM_FI_DEV_FB_USED", 40_000, DCGM, gpu=str(gpu)),  # MiB
                     _row(t, "DCGM_FI_DEV_POWER_USAGE", watts, DCGM, gpu=str(gpu)),
                     _row(t, "DCGM_FI_DEV_SM_CLOCK", 1980, DCGM, gpu=str(gpu))]
            if energy:
                rows.append(_row(t, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1e6 + watts * 1e3 * s, DCGM, gpu=str(gpu)))
        rows.append(_row(s, "vllm:num_requests_waiting", 2, ENGINE))
    return pd.DataFrame(rows)


def test_dcgm_names_in_one_unit_per_key():
    metrics = ServerMetrics.from_frame(_two_gpus())
    assert metrics.gauge("gpu_util").iloc[0] == pytest.approx(85.0)  # averaged over the GPUs
    assert metrics.gauge("gpu_mem_used").iloc[0] == pytest.approx(2 * 40_000 * 2**20)  # MiB -> bytes, summed
    assert metrics.gauge("gpu_power").iloc[0] == pytest.approx(400.0)
    assert metrics.sources("gpu_power") == [DCGM] and metrics.sources("waiting") == [ENGINE]


def test_energy_from_the_counter_and_from_integrated_power_agree():
    """400 W over 10 s: 4 kJ either way."""
    with_counter = ServerMetrics.from_frame(_two_gpus())
    assert energy_joules(with_counter, 0.0, 11.0) == (pytest.approx(4000.0), "energy counter")
    power_only = ServerMetrics.from_frame(_two_gpus(energy=False))
    assert energy_joules(power_only, 0.0, 11.0) == (pytest.approx(4000.0), "power integrated")
    summary = telemetry_summary(power_only, 0.0, 11.0, output_tokens=8000)
    assert summary["energy_per_output_token_j"] == pytest.approx(0.5)
    assert summary["gpu_util_pct_mean"] == pytest.approx(85.0) and summary["sources"] == [DCGM]


def test_gauges_of_two_sources_add_up_between_their_scrapes():
    """Two engines scraped at different instants: the total carries each one's last value forward."""
    rows = [_row(t, "vllm:num_requests_running", 3, "a") for t in (0.0, 1.0, 2.0)]
    rows += [_row(t, "vllm:num_requests_running", 5, "b") for t in (0.5, 1.5)]
    running = ServerMetrics.from_frame(pd.DataFrame(rows)).gauge("running")
    assert running.tolist() == [3.0, 8.0, 8.0, 8.0, 8.0]


def test_node_exporter_cpu_busy_and_network():
    rows = []
    for s in range(6):
        for cpu in ("0", "1", "2", "3"):  # each CPU idle 0.25 s of every second: 75% busy
            rows.append(_row(s, "node_cpu_seconds_total", 100 + 0.25 * s, NODE, cpu=cpu, mode="idle"))
            rows.append(_row(s, "node_cpu_seconds_total", 50 + 0.75 * s, NODE, cpu=cpu, mode="user"))
        rows.append(_row(s, "node_network_receive_bytes_total", 1e6 * s, NODE, device="eth0"))
        rows.append(_row(s, "node_network_receive_bytes_total", 9e9 * s, NODE, device="lo"))
    metrics = ServerMetrics.from_frame(pd.DataFrame(rows))
    assert np.allclose(host_cpu_busy(metrics).to_numpy(), 75.0)
    assert np.allclose(network_rate(metrics, "net_rx_bytes").to_numpy(), 1e6)  # loopback left out
    summary = telemetry_summary(metrics, 0.0, 5.0, output_tokens=None)
    assert summary["host_cpu_busy_pct_mean"] == pytest.approx(75.0) and "gpu_energy_j" not in summary


def test_gpu_chart_sits_under_latency_on_one_time_axis():
    from servescope.analyzers.synthetic import SyntheticSpec, synthetic_table

    frame = synthetic_table(SyntheticSpec(requests=300, rate=30, seed=3)).to_pandas()
    figure = gpu_over_time(frame, ServerMetrics.from_frame(_two_gpus()))
    names = [trace["name"] for trace in figure["data"]]
    assert names[:2] == ["TTFT p99 (ms)", "E2E p99 (ms)"]
    assert {"GPU utilisation (%)", "GPU memory used (GiB)", "GPU power (W)"} <= set(names)
    assert {trace.get("yaxis", "y") for trace in figure["data"]} == {"y", "y2", "y3", "y4"}
    assert gpu_over_time(frame, ServerMetrics.from_frame(pd.DataFrame())) is None
