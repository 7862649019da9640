"""The service's state (HTTP side): the engine client, the processor and the lifecycle.

A request goes down once and its results come up once:

    route -> Processor.process (service.processor: one JobSpec, every default filled)
          -> EngineClient.submit (engine.client: the 429 admission, the pipe to the engine)
          -> RequestHandle (service.outputs: the job's events, deadline, disconnect, encoding)
          -> rendered as JSON / raw bytes (service.responses) or SSE (service.streaming)

The pipelines, the model cache and the scheduler live in the engine core (`engine`), in its
own process by default (`QDS_ENGINE=process`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.client import EngineClient
from engine.compiling import compile_denoiser, default_warmup
from engine.core import EngineConfig, EngineHooks
from engine.failures import ShuttingDown
from engine.keys import ModelKey
from pipelines.loader import load_pipeline
from quantization.environment import resolve_device
from quantization.settings import QuantSettings
from service.auth import client_key
from service.metrics import Metrics
from service.outputs import Outcome, RequestHandle, StreamBuffer
from service.processor import ImageParams, Processor
from service.settings import ServiceSettings, batch_limit, lane_count
from service.variants import Variants

if TYPE_CHECKING:
    from fastapi import Request

    from engine.cache import ModelCache
    from engine.scheduler import Job, Scheduler
    from pipelines.loader import LoadedPipeline

log = logging.getLogger("qdserve.engine")


@dataclass
class ServiceState:
    quant: QuantSettings
    settings: ServiceSettings
    metrics: Metrics = field(default_factory=Metrics)
    warnings: list[str] = field(default_factory=list)
    # Hooks, replaceable before start-up (tests, benchmarks). They run in the engine: with
    # QDS_ENGINE=process they travel by pickle, so only module-level functions work there.
    warmup: Callable[..., None] = default_warmup
    compile: Callable[[LoadedPipeline, str], None] = compile_denoiser
    load: Callable[[QuantSettings], LoadedPipeline] = load_pipeline
    before_batch: Callable[[list[Job]], None] | None = None
    make_batch: Callable[..., Any] | None = None
    kind_of: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        self.variants = Variants(self.quant)
        self.default_key = self.variants.default_key
        self.model_id = self.variants.model_id
        self.preload_variants, warnings = self.variants.preload(self.settings.preload)
        self.warnings.extend(warnings)
        # The engine needs no API keys: they stay in the HTTP process. It gets the batch limit
        # resolved for its device, so the engine and the queue estimate agree on one number.
        device = resolve_device(self.quant.device)
        threads = self.settings.torch_threads or torch_default_threads()
        lanes = lane_count(self.settings.engine_lanes, device, threads)
        engine_settings = self.settings.model_copy(
            update={
                "api_keys": [],
                "max_batch": batch_limit(self.settings.max_batch, device, lanes),
                "engine_lanes": lanes,
            }
        )
        self.engine = EngineClient(
            EngineConfig(self.quant, engine_settings, self.preload_variants),
            mode=self.settings.engine,
            metrics=self.metrics,
            max_queue=self.settings.max_queue,
            max_queue_per_owner=self.settings.per_key_limit() if self.settings.api_keys else None,
        )
        # GPU gauges come from the engine's allocator, not this process's.
        self.metrics.gpu_source(self.engine.gpu_readings)
        # /v1/models and request checks read the engine's cache through this mirror.
        self.cache = self.engine.models
        self.processor = Processor(self.settings, self.variants, self.engine)
        # Edit uploads decoded at once (service.routes.edits).
        self.decodes = asyncio.Semaphore(self.settings.max_concurrent_decodes)

    # -- start-up / shut-down ----------------------------------------------------------
    def start(self) -> None:
        """Start the engine core; it loads the default model (and preloads) itself."""
        hooks = EngineHooks(
            load=self.load,
            warmup=self.warmup,
            compile=self.compile,
            before_batch=self.before_batch,
        )
        if self.make_batch is not None:
            hooks.make_batch = self.make_batch
        if self.kind_of is not None:
            hooks.kind_of = self.kind_of
        self.engine.config.hooks = hooks
        self.engine.start(asyncio.get_running_loop())

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine: queued requests get 503, running ones finish (up to `timeout`)."""
        self.engine.stop(timeout)

    def abandon_pending(self) -> int:
        """The graceful-shutdown deadline is near: answer every request still waiting with an
        OpenAI-shaped 503 now, while its handler can still write it (service.server)."""
        count = self.engine.abandon(
            "the server is shutting down and QDS_SHUTDOWN_TIMEOUT ran out before this request "
            "finished; retry on another replica"
        )
        if count:
            log.warning("shutdown deadline: answered %d unfinished request(s) with 503", count)
        return count

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def reason(self) -> str:
        return self.engine.reason

    @property
    def mode(self) -> str:
        """Which denoiser serves the default model: eager, compiling or compiled."""
        return self.engine.serving_mode

    def all_warnings(self) -> list[str]:
        return [*self.warnings, *self.engine.warnings]

    def queue_depth(self) -> int:
        return self.engine.depth()

    def admit(self, request: Request) -> None:
        """Raise QueueFull (429 + Retry-After) unless this request would be admitted now:
        checked before any costly work (an upload's decoding), and again at submission."""
        if not self.engine.accepting:
            raise ShuttingDown()
        self.engine.check_room(client_key(request))

    # -- the inline engine's internals (QDS_ENGINE=inline: tests, debugging) -------------
    @property
    def core_cache(self) -> ModelCache:
        return self._core().cache

    @property
    def scheduler(self) -> Scheduler:
        return self._core().scheduler

    def _core(self) -> Any:
        if self.engine.core is None:
            raise RuntimeError("the engine runs in its own process (QDS_ENGINE=inline for this)")
        return self.engine.core

    # -- choosing a cache variant ------------------------------------------------------
    def select(
        self, model: str | None, quant_backend: str | None, quant_type: str | None
    ) -> tuple[ModelKey, QuantSettings]:
        return self.variants.select(model, quant_backend, quant_type)

    def public_id(self, key: ModelKey) -> str:
        return self.variants.public_id(key)

    def loaded_ids(self) -> list[str]:
        return [k.variant_id for k in self.cache.loaded_keys()]

    # -- the request path --------------------------------------------------------------
    async def submit(
        self,
        params: ImageParams,
        *,
        owner: str = "",
        stream: bool = False,
        partial_images: int = 0,
    ) -> RequestHandle:
        """Process a request into its job spec and queue it in the engine; errors here are
        ordinary HTTP errors (4xx, the 429). `owner` is who sent it (`client_key`: fair
        admission across API keys). With `stream`, the job's per-step progress and its
        `partial_images` previews reach the handle's buffer too."""
        spec = await self.processor.process(
            params, owner=owner, partial_images=partial_images if stream else 0
        )
        buffer = StreamBuffer()
        job = self.engine.submit(
            spec.key,
            spec.variant,
            spec.request,
            allow_load=spec.allow_load,
            on_event=buffer.on_event if stream else None,
            previews=spec.previews,
            owner=spec.owner,
        )
        return RequestHandle(spec, job, self.engine.cancel, self.settings.request_timeout, buffer)

    async def run(self, request: Request, params: ImageParams) -> Outcome:
        """Serve one request in one piece, counted in qds_inflight_requests: submit it and
        await its encoded result (withdrawn if the client leaves or the deadline passes)."""
        with self.metrics.inflight.track_inprogress():
            handle = await self.submit(params, owner=client_key(request))
            return await handle.result(request)


def torch_default_threads() -> int:
    """torch's intra-op thread count here: the engine process starts with the same default."""
    import torch

    return torch.get_num_threads()
