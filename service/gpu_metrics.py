"""GPU memory read at scrape time by a custom Prometheus collector.

A collector (not a background thread) so every scrape sees the current numbers and an idle
service does no work. Without CUDA it yields nothing: absent series, not fake zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def _cuda_devices() -> list[int]:
    try:
        import torch
    except ImportError:  # the collector must never break a scrape
        return []
    if not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))


class GpuMemoryCollector(Collector):
    """qds_gpu_memory_{allocated,reserved,peak,total}_bytes per CUDA device."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = _cuda_devices()
        if not devices:
            return
        import torch

        families = {
            "allocated": GaugeMetricFamily(
                "qds_gpu_memory_allocated_bytes",
                "Bytes held by tensors (torch allocator).",
                labels=["device"],
            ),
            "reserved": GaugeMetricFamily(
                "qds_gpu_memory_reserved_bytes",
                "Bytes reserved by the torch caching allocator.",
                labels=["device"],
            ),
            "peak": GaugeMetricFamily(
                "qds_gpu_memory_peak_bytes",
                "Peak allocated bytes since start or last reset.",
                labels=["device"],
            ),
            "total": GaugeMetricFamily(
                "qds_gpu_memory_total_bytes", "Total memory of the device.", labels=["device"]
            ),
        }
        for index in devices:
            label = [f"cuda:{index}"]
            families["allocated"].add_metric(label, torch.cuda.memory_allocated(index))
            families["reserved"].add_metric(label, torch.cuda.memory_reserved(index))
            families["peak"].add_metric(label, torch.cuda.max_memory_allocated(index))
            families["total"].add_metric(
                label, torch.cuda.get_device_properties(index).total_memory
            )
        yield from families.values()


def read_gpu_gauges() -> dict[str, float]:
    """The collector's current samples as {name{device}: value} (for benchmarks and tests)."""
    out: dict[str, float] = {}
    for family in GpuMemoryCollector().collect():
        for sample in family.samples:
            out[f"{sample.name}{{{sample.labels['device']}}}"] = sample.value
    return out
