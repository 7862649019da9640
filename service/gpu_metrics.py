"""GPU memory read at scrape time by a custom Prometheus collector.

A collector (not a background thread) so every scrape sees the current numbers and an idle
service does no work. Without CUDA it yields nothing: absent series, not fake zeros.

The pipelines run in the engine process (engine), whose CUDA allocator is the one that
matters: there the engine reads `local_readings()` and sends them over; the HTTP process's
collector is built with `read=` the engine's last report. Called without `read`, it reads this
process's own allocator (benchmarks, tests, and the engine itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.gpu_memory import GpuReadings, local_readings

_HELP = {
    "allocated": "Bytes held by tensors (torch allocator).",
    "reserved": "Bytes reserved by the torch caching allocator.",
    "peak": "Peak allocated bytes since start or last reset.",
    "total": "Total memory of the device.",
}


class GpuMemoryCollector(Collector):
    """qds_gpu_memory_{allocated,reserved,peak,total}_bytes per CUDA device."""

    def __init__(self, read: Callable[[], GpuReadings] | None = None) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self.read() if self.read is not None else local_readings()
        if not readings:
            return
        families = {
            kind: GaugeMetricFamily(f"qds_gpu_memory_{kind}_bytes", doc, labels=["device"])
            for kind, doc in _HELP.items()
        }
        for device, values in readings.items():
            for kind, family in families.items():
                family.add_metric([device], values[kind])
        yield from families.values()


def read_gpu_gauges() -> dict[str, float]:
    """The collector's current samples as {name{device}: value} (for benchmarks and tests)."""
    out: dict[str, float] = {}
    for family in GpuMemoryCollector().collect():
        for sample in family.samples:
            out[f"{sample.name}{{{sample.labels['device']}}}"] = sample.value
    return out
