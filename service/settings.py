"""Service settings read from `QDS_*` environment variables (pydantic-settings).

The quantization settings (model, backend, ...) live in `quantization.settings`; these are the
HTTP, queue, cache and limit settings of the service itself.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quantization.planning.units import parse_bytes, parse_optional_bytes


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


# The fastest setting that kept the demo model's prompt adherence unchanged at 28 and 50 steps
# (docs/benchmarks/step-cache.md: 3.33x / 3.18x img/s at concurrency 1 / 16, 28 steps, mean
# PSNR 40.3 dB against the uncached image; fbcache:0.3 lost one prompt of 21 at 28 steps).
DEFAULT_STEP_CACHE = "taylorseer:6"


class ServiceSettings(BaseSettings):
    """Every field is `QDS_<NAME>`; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="QDS_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port uvicorn binds.")
    max_queue: int = Field(
        default=32,
        ge=1,
        description="Requests admitted and waiting for the engine (beyond it: 429 + Retry-After).",
    )
    max_queue_per_key: int = Field(
        default=0,
        ge=0,
        description="Requests one API key may have waiting (beyond it: 429 + Retry-After for "
        "that key while others still have room); waiting requests reach the engine in turn "
        "across keys. 0 = auto: three quarters of QDS_MAX_QUEUE, so one key can never hold "
        "the whole queue. Applies only with QDS_API_KEYS (no keys: one client, the whole "
        "queue).",
    )
    request_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a request may wait + run before a 504."
    )
    allow_on_demand_load: bool = Field(
        default=False, description="Load a requested backend that is not cached."
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of backend[:quant_type] loaded at start."
    )
    cache_max_entries: int = Field(default=2, ge=1, description="Pipelines kept loaded (LRU).")
    cache_memory_budget: Annotated[int | None, NoDecode] = Field(
        default=None, description="Bytes (or 8GB, 512MiB) of model storage kept loaded."
    )
    max_pixels: int = Field(default=1024 * 1024, ge=64, description="Largest width x height.")
    max_steps: int = Field(default=50, ge=1, description="Largest num_inference_steps.")
    max_images: int = Field(default=4, ge=1, description="Largest n per request.")
    max_prompt_chars: int = Field(default=2000, ge=1, description="Longest prompt, characters.")
    max_body_bytes: Annotated[int, NoDecode] = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body (bytes, or e.g. 1MiB) of JSON and other non-upload "
        "requests; larger ones get 413 before they are buffered.",
    )
    max_upload_bytes: Annotated[int, NoDecode] = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest multipart/form-data body (bytes, or e.g. 32MiB), for image uploads.",
    )
    max_upload_pixels: int = Field(
        default=4096 * 4096,
        ge=64,
        # Pillow's Image.MAX_IMAGE_PIXELS (it warns above, refuses above twice that): capped
        # so that this limit, checked from the header before decoding, is the one that fires.
        le=89_478_485,
        description="Largest uploaded image, width x height, refused from its header before "
        "any pixel is decoded (decompression bombs); at most 89478485.",
    )
    default_steps: int | None = Field(
        default=None, ge=1, description="Steps when a request names none (model default if unset)."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma list of accepted bearer keys; unset = no auth (a warning at start "
        "on a non-loopback address, and on /readyz). Set but holding no key (empty, ' , ') "
        "refuses to start.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR (WARNING hides access lines)."
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line; text: human-readable."
    )
    max_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Most images denoised together: requests join a running batch at the next "
        "step (no batching window); 1 turns batching off; with lanes every batch (whole-call "
        "ones too) takes its share. "
        "auto: 8 per engine lane on CPU (16 with the default 2 lanes; "
        "docs/benchmarks/batch-size.md), 4 on a GPU (large images already fill a "
        "GPU at batch 1, and a bigger batch needs more memory; not swept there).",
    )
    engine_lanes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Step batches of one model denoised at the same time, each on its own "
        "thread with an even share of the torch threads; a batch takes 4 images before the next "
        "lane opens, then the emptiest fills up to its share of QDS_MAX_BATCH; a batch running "
        "alone keeps every thread. "
        "auto: 2 on a CPU with 2 or more torch threads (docs/benchmarks/batch-size.md: two "
        "half batches at once against one batch on every thread), 1 on a GPU (one CUDA "
        "stream; not measured there).",
    )
    engine_stall_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds the engine process may go without any sign of life (it reports "
        "in once a second while it has work, every few seconds when idle) before it is taken "
        "as hung (stopped, deadlocked, a step that never returns): readiness 503 at once, "
        "waiting requests 503 engine_unavailable with Retry-After, the engine killed and "
        "restarted. Must exceed the longest single denoising step (a first compile of a new "
        "shape included) and be shorter than QDS_REQUEST_TIMEOUT; 0 turns it off, otherwise "
        "at least 2.",
    )
    model_load_timeout: float = Field(
        default=1800.0,
        ge=0,
        description="Seconds one model load (hub download, quantization, compile and warm-up "
        "included) may take before it is taken as hung: its waiters get 503 and the engine is "
        "restarted (loads run one at a time, so a hung one would block every later one); "
        "raise it for a first download of a large model over a slow link; 0 turns it off.",
    )
    engine: Literal["process", "inline"] = Field(
        default="process",
        description="process: the pipelines run in their own process (production); inline: "
        "on a thread of the HTTP process (tests and debugging only).",
    )
    prompt_cache_bytes: int = Field(
        default=64 * 2**20, ge=0, description="Bytes of prompt embeddings cached; 0 turns it off."
    )
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="torch.compile the denoiser (QDS_COMPILE_SCOPE; in the background or "
        "before ready: QDS_COMPILE_BACKGROUND). auto: on for Flux step batching on a CPU with a "
        "C++ compiler (inductor needs one; the images have g++) and a backend measured faster "
        "compiled as served "
        "(`compiles_by_default`); off on GPUs and whole-call pipelines; true / false force it.",
    )
    compile_scope: Literal["auto", "model", "blocks"] = Field(
        default="auto",
        description="What QDS_COMPILE compiles. model: the whole denoiser, one graph (on this "
        "2-core CPU faster as served than blocks: docs/benchmarks/compile-serving.md; a longer "
        "first compile); blocks: its repeated blocks, compiled once and reused (diffusers' "
        "regional compilation: a shorter first compile). auto: model on a CPU, blocks "
        "elsewhere (a whole Flux-size compile on a GPU was not measured).",
    )
    compile_shared_threads: bool = Field(
        default=True,
        description="CPU only: compile kernels that read their thread count when they run "
        "(inductor's `cpp.dynamic_threads`), so the engine's threads and a lane's share one "
        "graph: half the graphs to compile (an empty cache reached compiled mode in 54 s "
        "instead of 88 s, embedded model, 2 CPUs; 65 s instead of 97 s in the container). "
        "Once compiled, with the default step cache: 1.04x / 1.01x / 1.02x img/s at "
        "concurrency 1 / 4 / 16 and 1.04x / 1.00x / 1.03x with the sides swapped; with "
        "QDS_STEP_CACHE=off about 0.95x at 16 (docs/deploy.md), where false is the faster "
        "choice if a filled cache (`qdserve warmup`, the volume) makes the longer first "
        "compile a one-time cost. `qdserve warmup` must run with the same value as the server "
        "to fill its cache.",
    )
    compile_background: bool = Field(
        default=True,
        description="With QDS_COMPILE on and the whole denoiser compiled (scope model): "
        "ready as soon as the model is loaded, serving eager while a background thread "
        "compiles every warm-up shape (and any shape first seen later); requests switch to a "
        "compiled graph once it exists and never wait on a compile (/readyz `mode`, "
        "qds_serving_mode). Once compiled it serves the foreground path's img/s within noise "
        "(docs/benchmarks/background-compile-ab.md). false: compile and warm up before "
        "/readyz turns 200.",
    )
    warmup_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of WxH warmed up at start (compile)."
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op CPU threads; 0 = torch's default. On CPUs shared with "
        "other processes 1 avoids OpenMP spin contention (measured 35x slower with 2 threads "
        "on 2 busy cores).",
    )
    loras: str = Field(
        default="",
        description="LoRA adapters loaded at start into every pipeline, chosen per request "
        "(`lora` field): comma list of name=source, source a .safetensors file or folder "
        "(diffusers, kohya or PEFT format) or a hub repo id (repo:weight_name picks a file); a "
        "bare name is a shipped adapter (orange: the demo model's). Empty: none.",
    )
    docs: bool = Field(
        default=True,
        description="Serve the API documentation: /docs (Swagger UI), /redoc and "
        "/openapi.json, with their JavaScript and CSS from the installed package (no CDN: "
        "they render offline); false leaves all three out.",
    )
    playground: bool = Field(
        default=True,
        description="Serve the playground page at /playground (and redirect / to it): "
        "generate and edit from a browser, partial images shown as they stream; false "
        "leaves it out.",
    )
    step_cache: str = Field(
        default=DEFAULT_STEP_CACHE,
        description="Step caching (a request's `step_cache` field overrides it per call): "
        "`off`, `fbcache:<threshold>` (first-block cache, threshold `0`..`1`, e.g. "
        "`fbcache:0.1`, `fbcache:0.2`, `fbcache:0.3`) or `taylorseer:<interval>` (TaylorSeer: "
        "the whole denoiser every `1`..`10` steps after 3 full ones, the steps between "
        "extrapolated, e.g. `taylorseer:2`, `taylorseer:3`): per sample in the Flux step loop, "
        "diffusers' FirstBlockCache / TaylorSeer hooks for whole-call pipelines and edits (not "
        "applied where the denoiser is compiled). Default `taylorseer:6`: the fastest measured "
        "setting with the demo model's prompt adherence unchanged at 28 and 50 steps (README, "
        "Step caching; docs/benchmarks/step-cache.md).",
    )
    shutdown_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a graceful shutdown waits for running / queued requests; 0 = "
        "do not wait (fractions allowed). Whatever is still open then gets a 503 "
        "shutting_down; the whole shutdown, engine stop included, takes at most this plus "
        "10 s (the grace period of the manifests allows for that).",
    )
    max_concurrent_decodes: int = Field(
        default=2,
        ge=1,
        description="Edit uploads decoded at the same time (each a full-resolution image in "
        "memory until it is brought to the output size); more wait their turn.",
    )

    @field_validator("preload", "warmup_sizes", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        keys = _split(value)
        if isinstance(value, str) and not keys:
            # A Secret with an empty value, or a stray comma: keys were meant, none came.
            raise ValueError(
                f"QDS_API_KEYS is set but holds no key ({value!r}); set at least one key, or "
                "unset QDS_API_KEYS to serve without authentication"
            )
        return keys

    @field_validator("cache_memory_budget", mode="before")
    @classmethod
    def _budget(cls, value: object) -> int | None:
        return parse_optional_bytes(value, "QDS_CACHE_MEMORY_BUDGET")

    @field_validator("max_body_bytes", "max_upload_bytes", mode="before")
    @classmethod
    def _body_limits(cls, value: object, info: ValidationInfo) -> object:
        name = f"QDS_{(info.field_name or '').upper()}"
        # 0 / empty are not "no limit" here: an unbounded body is the defect this prevents.
        if value in (0, "0", ""):
            raise ValueError(f"{name} must be a positive size, e.g. 1MiB")
        return parse_bytes(value, name)

    @field_validator("loras")
    @classmethod
    def _loras(cls, value: str) -> str:
        from pipelines.lora import parse_loras

        parse_loras(value)  # raises ValueError naming the bad entry
        return value

    @cached_property
    def lora_names(self) -> list[str]:
        """The declared adapters' names, in declaration order."""
        from pipelines.lora import parse_loras

        return [spec.name for spec in parse_loras(self.loras)]

    @field_validator("step_cache")
    @classmethod
    def _step_cache(cls, value: str) -> str:
        from pipelines.step_cache import canonical

        return canonical(value)  # raises ValueError naming the grammar

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            if not re.fullmatch(r"\d+x\d+", size):
                raise ValueError(f"QDS_WARMUP_SIZES entry {size!r} is not WxH (e.g. 512x512)")
        return value

    @field_validator("engine_stall_timeout")
    @classmethod
    def _stall_timeout(cls, value: float) -> float:
        # The engine's sign of life comes once per telemetry period (1 s): a shorter limit
        # would kill healthy engines.
        if 0 < value < 2:
            raise ValueError(
                f"QDS_ENGINE_STALL_TIMEOUT={value:g}: use 0 (off) or at least 2 seconds "
                "(the engine reports in once a second)"
            )
        return value

    @model_validator(mode="after")
    def _stall_below_request_timeout(self) -> ServiceSettings:
        if "engine_stall_timeout" not in self.model_fields_set:
            # The default follows a short QDS_REQUEST_TIMEOUT down (tests, small deployments):
            # 60 s, at most half the request timeout, at least 2 s (off when even that is not
            # shorter).
            auto = min(60.0, max(2.0, self.request_timeout / 2))
            self.engine_stall_timeout = auto if auto < self.request_timeout else 0.0
            return self
        stall = self.engine_stall_timeout
        if stall and stall >= self.request_timeout:
            raise ValueError(
                f"QDS_ENGINE_STALL_TIMEOUT={stall:g} must be shorter than "
                f"QDS_REQUEST_TIMEOUT={self.request_timeout:g}: otherwise a hung engine is "
                "never detected (each request times out first and leaves the watchdog "
                "nothing to act on)"
            )
        return self

    def per_key_limit(self) -> int:
        """QDS_MAX_QUEUE_PER_KEY resolved: auto is three quarters of QDS_MAX_QUEUE."""
        if self.max_queue_per_key:
            return min(self.max_queue_per_key, self.max_queue)
        return max(1, (self.max_queue * 3) // 4)


# How much longer than QDS_SHUTDOWN_TIMEOUT a shutdown may take: answering what is still open,
# then stopping the engine (service.server, engine.client.stop); the manifests' grace period
# allows for it.
SHUTDOWN_MARGIN_S = 10.0


# The `auto` batch limits: on a CPU 8 images per lane (docs/benchmarks/batch-size.md: one
# batch peaked at 8-12, and two lanes of 8 were the fastest row with lanes); the accelerator
# value is the earlier default (the H100 and H200 peer runs used it, no sweep).
AUTO_MAX_BATCH_CPU = 8
AUTO_MAX_BATCH_ACCELERATOR = 4


AUTO_LANES_CPU = 2


def lane_count(lanes: int | Literal["auto"], device: str, torch_threads: int) -> int:
    """QDS_ENGINE_LANES resolved for the engine's device and its torch thread count."""
    if lanes != "auto":
        return int(lanes)
    return AUTO_LANES_CPU if device == "cpu" and torch_threads >= AUTO_LANES_CPU else 1


def batch_limit(max_batch: int | Literal["auto"], device: str, lanes: int = 1) -> int:
    """QDS_MAX_BATCH resolved for the engine's device (`cpu`, `cuda`, `cuda:N`) and its
    resolved lane count: auto is 8 per lane on a CPU."""
    if max_batch != "auto":
        return int(max_batch)
    return AUTO_MAX_BATCH_CPU * lanes if device == "cpu" else AUTO_MAX_BATCH_ACCELERATOR
