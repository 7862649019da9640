"""GPU memory of this process's CUDA allocator, read where the pipelines run (the engine).

The engine sends these readings with its status; the HTTP process's Prometheus collector
(`service.gpu_metrics`) serves the last report. Without CUDA: {} (absent series, not zeros).
"""

from __future__ import annotations

# device label ("cuda:0") -> {"allocated", "reserved", "peak", "total"} in bytes.
GpuReadings = dict[str, dict[str, int]]


def _cuda_devices() -> list[int]:
    try:
        import torch
    except ImportError:  # the collector must never break a scrape
        return []
    if not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))


def local_readings() -> GpuReadings:
    """This process's CUDA allocator, per device; {} without CUDA."""
    devices = _cuda_devices()
    if not devices:
        return {}
    import torch

    return {
        f"cuda:{i}": {
            "allocated": torch.cuda.memory_allocated(i),
            "reserved": torch.cuda.memory_reserved(i),
            "peak": torch.cuda.max_memory_allocated(i),
            "total": torch.cuda.get_device_properties(i).total_memory,
        }
        for i in devices
    }
