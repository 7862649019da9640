"""The GPU memory collector: silent without CUDA, exact against torch's readings with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from service.gpu_metrics import GpuMemoryCollector, read_gpu_gauges


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_collector_reports_nothing_without_cuda() -> None:
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector())
    assert b"qds_gpu_memory" not in generate_latest(registry)
    assert read_gpu_gauges() == {}


@pytest.mark.gpu
def test_collector_matches_torch_readings() -> None:
    before = read_gpu_gauges()["qds_gpu_memory_allocated_bytes{cuda:0}"]
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    gauges = read_gpu_gauges()
    assert gauges["qds_gpu_memory_allocated_bytes{cuda:0}"] == torch.cuda.memory_allocated(0)
    assert gauges["qds_gpu_memory_allocated_bytes{cuda:0}"] - before >= block.numel()
    assert (
        gauges["qds_gpu_memory_reserved_bytes{cuda:0}"]
        >= gauges["qds_gpu_memory_allocated_bytes{cuda:0}"]
    )
    total = torch.cuda.get_device_properties(0).total_memory
    assert gauges["qds_gpu_memory_total_bytes{cuda:0}"] == total
    del block


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("backend", "qtype"), [("bitsandbytes_4bit", "nf4"), ("torchao", "int8wo")]
)
def test_gauges_track_a_quantized_load(embedded_path: Path, backend: str, qtype: str) -> None:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    torch.cuda.empty_cache()
    before = read_gpu_gauges()["qds_gpu_memory_allocated_bytes{cuda:0}"]
    loaded = load_pipeline(
        QuantSettings(
            model=str(embedded_path), quant_backend=backend, quant_type=qtype, device="cuda"
        )
    )
    grown = read_gpu_gauges()["qds_gpu_memory_allocated_bytes{cuda:0}"] - before
    print(
        f"GAUGE {backend} {qtype}: allocated grew {grown} B, storage {loaded.storage_bytes} B, "
        f"ratio {grown / loaded.storage_bytes:.3f}"
    )
    # The allocator rounds each tensor up to 512 B blocks; small models pay that per tensor.
    assert 0.9 * loaded.storage_bytes <= grown <= 1.25 * loaded.storage_bytes + 8 * 2**20
    loaded.release()
