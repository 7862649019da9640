"""Prometheus metrics: exactly the families in `service.metric_names`, in a per-app registry.

A per-app `CollectorRegistry` (not the global default) lets tests run several apps in one
process without "Duplicated timeseries" errors; the process / platform collectors are added to
each registry so `process_*` memory gauges are still exported (the HTTP process's own; the
engine process reports its resident memory as `qds_engine_resident_memory_bytes`).

The registry lives in the HTTP process. The engine process (engine) records its
observations (latency, loads, model memory, GPU memory, cancellations, prompt cache) with
`engine.telemetry.MetricsRecorder`, and they are applied here; see that module for why
this and not prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from engine.telemetry import record_evicted, record_loaded
from quantization.backends import BACKENDS
from quantization.environment import detect_device, library_version
from service.gpu_metrics import GpuMemoryCollector, GpuReadings

# `*_created` timestamp series are not part of the metric contract and only add cardinality.
disable_created_metrics()

# Image generation takes from tens of milliseconds (tiny models, CPU) to minutes (Flux-dev at
# 1024x1024 with 50 steps on a small GPU): spread the buckets over that range.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """All of the service's metric objects, registered in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._gpu = GpuMemoryCollector()
        r.register(self._gpu)

        self.request_duration = Histogram(
            "qds_request_duration_seconds",
            "HTTP request latency",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "qds_queue_wait_seconds",
            "Time a request waited in the engine queue before joining a step batch",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "qds_inference_duration_seconds",
            "Time a request spent in the engine's batches (first step to its images decoded); "
            "lora: none, the adapter's declared name, or multiple",
            ["model", "backend", "quant_type", "lora"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "qds_step_duration_seconds",
            "Duration of one denoising step (of the whole step batch)",
            ["model", "backend", "quant_type"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "qds_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.images = Counter("qds_images_generated", "Images generated", ["backend"], registry=r)
        self.errors = Counter(
            "qds_errors",
            "Errors by kind (validation, timeout, oom, internal, rejected)",
            ["kind"],
            registry=r,
        )
        self.cache_hits = Counter("qds_cache_hits", "Model cache hits", registry=r)
        self.cache_misses = Counter("qds_cache_misses", "Model cache misses", registry=r)
        self.cache_evictions = Counter(
            "qds_cache_evictions", "Pipelines evicted from the cache", registry=r
        )
        self.model_loads = Counter(
            "qds_model_loads",
            "Model loads by outcome (success, failure)",
            ["backend", "outcome"],
            registry=r,
        )
        self.gpu_oom = Counter("qds_gpu_oom", "Out-of-memory errors during inference", registry=r)
        self.queue_depth = Gauge(
            "qds_queue_depth", "Requests waiting to join a step batch in the engine", registry=r
        )
        self.inflight = Gauge(
            "qds_inflight_requests", "Generation requests being handled", registry=r
        )
        self.cache_entries = Gauge("qds_cache_entries", "Pipelines loaded", registry=r)
        self.model_ready = Gauge(
            "qds_model_ready", "1 when the default model is loaded and warm", registry=r
        )
        self.model_memory = Gauge(
            "qds_model_memory_bytes",
            "Real storage bytes of each loaded component",
            ["model", "backend", "quant_type", "component"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "qds_model_load_seconds",
            "Seconds the last load of a model variant took",
            ["model", "backend"],
            registry=r,
        )
        self.cancelled = Counter(
            "qds_cancelled",
            "Requests removed from the queue or the running batch before their end, by reason "
            "(client_gone, timeout, shutdown)",
            ["reason"],
            registry=r,
        )
        self.prompt_cache_hits = Counter(
            "qds_prompt_cache_hits", "Prompt embeddings reused from the cache", registry=r
        )
        self.prompt_cache_misses = Counter(
            "qds_prompt_cache_misses", "Prompts run through the text encoders", registry=r
        )
        self.prompt_cache_bytes = Gauge(
            "qds_prompt_cache_bytes", "Bytes of prompt embeddings held by the cache", registry=r
        )
        self.step_cache_blocks = Counter(
            "qds_step_cache_blocks",
            "Transformer block runs of step-cached samples (one sample through one block), by "
            "outcome: computed, or skipped (the cached residual reused); step loop only",
            ["outcome"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "qds_engine_restarts",
            "Times the engine process died and was started again",
            registry=r,
        )
        self.engine_stalls = Counter(
            "qds_engine_stalls",
            "Times the watchdog found the engine hung (no sign of life for "
            "QDS_ENGINE_STALL_TIMEOUT, or a load over QDS_MODEL_LOAD_TIMEOUT) and killed it",
            registry=r,
        )
        self.engine_memory = Gauge(
            "qds_engine_resident_memory_bytes",
            "Resident memory of the engine process (the pipelines live there)",
            registry=r,
        )
        self.serving_mode = Gauge(
            "qds_serving_mode",
            "Which denoiser serves the default model (1 for the current mode): eager, "
            "compiling (eager while the compiled graphs build in the background), compiled",
            ["mode"],
            registry=r,
        )
        self.denoiser_forwards = Counter(
            "qds_denoiser_forwards",
            "Denoiser forwards of the default model by path: a compiled graph or eager",
            ["path"],
            registry=r,
        )
        self.build_info = Info("qds_build", "qdserve build and library versions", registry=r)
        self.build_info.info(build_labels())

    def gpu_source(self, read: Callable[[], GpuReadings]) -> None:
        """Read the GPU gauges from `read` (the engine process's last report) instead of this
        process's own CUDA allocator."""
        self._gpu.read = read

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def loaded(self, loaded: Any) -> None:
        record_loaded(self, loaded)

    def evicted(self, loaded: Any) -> None:
        record_evicted(self, loaded)


def build_labels() -> dict[str, str]:
    device = detect_device()
    labels = {
        "version": library_version("qdserve") or "dev",
        "python": platform.python_version(),
        "device": device.label,
    }
    # The stack, then every registered backend's library (from the registry: a new backend's
    # library is listed without an edit here).
    backend_dists = [b.distribution for b in BACKENDS.values() if b.distribution]
    for dist in dict.fromkeys(["torch", "diffusers", "transformers", *backend_dists]):
        labels[dist.replace("-", "_")] = library_version(dist) or "absent"
    return labels
