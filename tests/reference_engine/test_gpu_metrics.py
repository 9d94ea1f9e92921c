"""The engine's own GPU gauges: exported where torch can read them, read by the analyzers as GPU telemetry."""

import pandas as pd
import pytest
import torch

from servescope.analyzers.server_metrics import ServerMetrics
from servescope.harness.scrape import parse_samples
from servescope.reference_engine.metrics import EngineMetrics


def _scraped(text: str) -> ServerMetrics:
    return ServerMetrics.from_frame(pd.DataFrame(parse_samples(text, 0.0, "engine")))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_initialized(), reason="CUDA is in use here")
def test_no_gpu_series_without_a_cuda_device_in_use():
    text = EngineMetrics("m").render().decode()
    assert "servescope:gpu_" not in text
    assert not _scraped(text).has("gpu_mem_used")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_is_exported_and_read_as_telemetry():
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # the engine's device is in use
    free, total = torch.cuda.mem_get_info()
    metrics = _scraped(EngineMetrics("m").render().decode())
    used = float(metrics.gauge("gpu_mem_used").iloc[0])
    assert used >= held.numel() and abs(used - (total - free)) < 512 * 2**20  # other processes may move it a little
    assert float(metrics.gauge("gpu_mem_total").iloc[0]) == total
    if metrics.has("gpu_util"):  # NVML present: utilisation in percent
        assert 0.0 <= float(metrics.gauge("gpu_util").iloc[0]) <= 100.0
