"""The engine's own GPU telemetry: utilisation, memory and power of its device, read through torch at scrape time.

Exported as `servescope:gpu_utilization_perc`, `servescope:gpu_memory_used_bytes`,
`servescope:gpu_memory_total_bytes` and `servescope:gpu_power_watts` (label
`gpu`, the CUDA device index), which servescope's analyzers read beside
DCGM's names, so a run without a DCGM exporter still plots its GPU. Memory
comes from `torch.cuda.mem_get_info` (the whole device, as nvidia-smi shows
it, not only this process's tensors); utilisation and power need NVML
(`pynvml`), and are left out where torch cannot read them. Nothing is
exported without CUDA, or before the engine has touched its device.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily


class GpuCollector:
    """A prometheus_client collector of the current CUDA device's gauges; `labels` are the engine's own."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return  # never create a CUDA context just to be scraped
        device = torch.cuda.current_device()
        names, values = [*self.labels, "gpu"], [*self.labels.values(), str(device)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        free, total = torch.cuda.mem_get_info(device)
        yield gauge("servescope:gpu_memory_used_bytes", "Device memory in use (all processes), bytes.", float(total - free))
        yield gauge("servescope:gpu_memory_total_bytes", "Device memory, bytes.", float(total))
        for name, doc, read, scale in (
            ("servescope:gpu_utilization_perc", "Percent of the last sample period a kernel ran (NVML).",
             torch.cuda.utilization, 1.0),
            ("servescope:gpu_power_watts", "Power draw (NVML), watts.", torch.cuda.power_draw, 1e-3),  # NVML: mW
        ):
            try:
                value = float(read(device)) * scale
            except Exception:  # noqa: BLE001 - no NVML (pynvml missing, a MIG slice): leave the gauge out
                continue
            yield gauge(name, doc, value)
