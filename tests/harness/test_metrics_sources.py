"""Several --metrics-url endpoints in one run: the engine, a DCGM exporter and node-exporter, each sample tagged.

The exporter here is a real HTTP server on 127.0.0.1 speaking the Prometheus
text format with DCGM's and node-exporter's names, as a GPU node would serve them.
"""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from rich.console import Console
from support.scripted_server import ScriptedServer

from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.orchestration.repeat import execute_run

pytestmark = pytest.mark.timeout(120)

WATTS = 250.0  # per GPU, two GPUs


class _NodeExporter(BaseHTTPRequestHandler):
    """DCGM exporter and node-exporter text, its counters following the wall clock."""

    started = time.monotonic()

    def do_GET(self) -> None:  # noqa: N802
        elapsed = time.monotonic() - self.started
        lines = []
        for gpu in ("0", "1"):
            labels = f'gpu="{gpu}",UUID="GPU-{gpu}",modelName="NVIDIA H200"'
            lines += [f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} 87",
                      f"DCGM_FI_DEV_FB_USED{{{labels}}} 61440",
                      f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} {WATTS}",
                      f"DCGM_FI_DEV_SM_CLOCK{{{labels}}} 1980",
                      f"DCGM_FI_DEV_MEM_COPY_UTIL{{{labels}}} 41",
                      f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} {1e6 + WATTS * 1e3 * elapsed:.0f}"]
        for cpu in ("0", "1"):
            lines += [f'node_cpu_seconds_total{{cpu="{cpu}",mode="idle"}} {1000 + 0.5 * elapsed:.3f}',
                      f'node_cpu_seconds_total{{cpu="{cpu}",mode="user"}} {500 + 0.5 * elapsed:.3f}']
        lines.append(f'node_network_transmit_bytes_total{{device="eth0"}} {1e6 * elapsed:.0f}')
        body = ("# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n" + "\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def exporter():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NodeExporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_each_endpoint_is_scraped_and_tagged_and_the_gpu_reaches_the_summary_and_report(tmp_path, exporter):
    with ScriptedServer(default_script={"tokens": 8, "itl_s": 0.005}) as srv:
        engine = f"{srv.base_url}/metrics"
        dead = "http://127.0.0.1:9/metrics"  # nothing listens: reported, and the run goes on
        config = RunConfig(target=srv.base_url, model="scripted", concurrency=4, duration_s="4s", max_tokens=8,
                           prompt_tokens=16, out=str(tmp_path / "run"), workers=1,
                           metrics_url=(engine, exporter, dead))
        text = io.StringIO()
        outcome = execute_run(config, RunConsole(show_progress=False, console=Console(file=text, width=200)))
    assert outcome.exit_code == 0
    run_dir = outcome.run_dir
    samples = pq.read_table(run_dir / "server_metrics.parquet").to_pandas()
    assert set(samples["source"]) == {engine, exporter}
    assert set(samples.loc[samples["source"] == exporter, "name"]) >= {"DCGM_FI_DEV_POWER_USAGE", "node_cpu_seconds_total"}
    assert "DCGM_FI_DEV_GPU_UTIL" not in set(samples.loc[samples["source"] == engine, "name"])
    sources = json.loads((run_dir / "run.json").read_text())["server_metrics"]["sources"]
    assert [s["url"] for s in sources] == [engine, exporter, dead]
    assert [s["available"] for s in sources] == [True, True, False] and sources[2]["reason"]
    assert sources[1]["scrapes"] >= 3
    summary = json.loads((run_dir / "summary.json").read_text())
    telemetry = summary["telemetry"]
    assert telemetry["gpu_util_pct_mean"] == pytest.approx(87.0)
    assert telemetry["gpu_mem_used_gib_max"] == pytest.approx(120.0)  # 2 x 61440 MiB
    assert telemetry["gpu_power_w_mean"] == pytest.approx(2 * WATTS)
    assert telemetry["host_cpu_busy_pct_mean"] == pytest.approx(50.0, abs=5.0)  # each CPU idle half of every second
    # Energy from the exporter's counter over the summary's window, per token generated in it.
    overall = summary["overall"]
    tokens = overall["output_tok_per_s"] * overall["duration_s"]
    assert telemetry["gpu_energy_from"] == "energy counter"
    assert telemetry["energy_per_output_token_j"] == pytest.approx(telemetry["gpu_energy_j"] / tokens)
    assert telemetry["gpu_energy_j"] == pytest.approx(2 * WATTS * overall["duration_s"], rel=0.5)  # scrape-grained
    assert f"GPU energy: {telemetry['energy_per_output_token_j']:.3g} J per output token" in text.getvalue()
    report = (run_dir / "report.html").read_text()
    assert "GPU utilisation, memory and power beside latency" in report and "Host CPU and network" in report
    assert f"{telemetry['energy_per_output_token_j']:.3f} J/token" in report and "GPU utilisation, % (mean / max)" in report
