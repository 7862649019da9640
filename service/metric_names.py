"""The metric families the service exports: the contract deploy/ files are checked against.

`service.metrics` must register exactly these (tests check both directions). Histograms also
expose `_bucket`, `_sum` and `_count`; counters `_total` is part of the name here.
"""

from __future__ import annotations

HISTOGRAMS = (
    "qds_request_duration_seconds",  # endpoint, status
    "qds_queue_wait_seconds",  # backend
    "qds_inference_duration_seconds",  # model, backend, quant_type, lora
    "qds_step_duration_seconds",  # model, backend, quant_type
)
COUNTERS = (
    "qds_requests_total",  # endpoint, status
    "qds_images_generated_total",  # backend
    "qds_errors_total",  # kind: validation, timeout, oom, internal, rejected
    "qds_cache_hits_total",
    "qds_cache_misses_total",
    "qds_cache_evictions_total",
    "qds_model_loads_total",  # backend, outcome
    "qds_gpu_oom_total",
    "qds_cancelled_total",  # reason: client_gone, timeout, shutdown
    "qds_prompt_cache_hits_total",
    "qds_prompt_cache_misses_total",
    "qds_engine_restarts_total",
    "qds_engine_stalls_total",  # the watchdog found the engine hung (then a restart)
    "qds_step_cache_blocks_total",  # outcome: computed, skipped
    "qds_denoiser_forwards_total",  # path: compiled, eager
)
GAUGES = (
    "qds_queue_depth",
    "qds_inflight_requests",
    "qds_cache_entries",
    "qds_model_ready",  # 1 when the default model is loaded and warm
    "qds_model_memory_bytes",  # model, backend, quant_type, component
    "qds_model_load_seconds",  # model, backend
    "qds_prompt_cache_bytes",
    "qds_engine_resident_memory_bytes",
    "qds_serving_mode",  # mode: eager, compiling, compiled (1 for the current one)
)
# Read at scrape time by a custom collector; absent (not zero) without CUDA.
GPU_GAUGES = (
    "qds_gpu_memory_allocated_bytes",  # device
    "qds_gpu_memory_reserved_bytes",
    "qds_gpu_memory_peak_bytes",
    "qds_gpu_memory_total_bytes",
)
INFO = ("qds_build_info",)  # version, torch, diffusers, backend library versions, device

ALL = HISTOGRAMS + COUNTERS + GAUGES + GPU_GAUGES + INFO
# Families from prometheus-client's default collectors that deploy files may also use.
STANDARD_PREFIXES = ("process_", "python_", "up", "scrape_")
