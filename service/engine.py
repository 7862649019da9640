"""The service's state and the request path shared by every generation endpoint (HTTP side).

request -> pick the cache variant -> make sure the engine has it loaded (single-flight load
there) -> resolve the request against the model's defaults -> submit it to the engine core
(queue admission: 429 when full) -> await the result under the deadline (cancelling it in the
engine if the client leaves or the deadline passes) -> encode the images (on the loop if tiny,
else in a thread).

The pipelines, the model cache and the scheduler live in the engine core (`engine`),
in its own process by default (`QDS_ENGINE=process`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.client import EngineClient, PendingJob
from engine.compiling import compile_denoiser, default_warmup
from engine.core import EngineConfig, EngineHooks
from engine.failures import ModelNotLoaded, ShuttingDown
from engine.keys import ModelKey
from engine.messages import Finished
from pipelines.generate import GenerationRequest, image_seeds
from pipelines.loader import load_pipeline
from quantization.environment import resolve_device
from quantization.settings import QuantSettings
from service import exceptions as errors
from service.imaging import encode_all
from service.metrics import Metrics
from service.resolve import ImageParams, check_limits, check_lora_variant, resolve
from service.settings import ServiceSettings, batch_limit, lane_count
from service.variants import Variants

if TYPE_CHECKING:
    from fastapi import Request

    from engine.cache import ModelCache
    from engine.scheduler import Job, Scheduler
    from pipelines.loader import LoadedPipeline
    from pipelines.token_usage import TokenUsage

log = logging.getLogger("qdserve.engine")

# Fallback disconnect polling period, only for an ASGI server whose `receive` answers at once
# with something other than a disconnect once the body is read (uvicorn blocks until then).
_POLL_S = 0.1
# Results of at most this many pixels (all images together) are encoded on the event loop
# (a noisy 32x32 PNG: ~0.2 ms; 128x128: ~1.4 ms, the most the loop is held): cheaper than the
# hop to a thread and back. Larger ones go to a thread (PNG level 1: ~56 ms for 1024x1024),
# where Pillow's encoder releases the GIL, so the loop keeps serving meanwhile.
INLINE_ENCODE_PIXELS = 128 * 128


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing will read the answer."""


@dataclass
class Submitted:
    """A request queued in the engine: what it asked, what it resolved to, its job."""

    key: ModelKey
    params: ImageParams
    request: GenerationRequest  # resolved: seed, size, steps set
    job: PendingJob
    deadline: float  # time.monotonic() by which it must be answered

    @property
    def seeds(self) -> list[int]:
        return image_seeds(int(self.request.seed or 0), self.request.num_images)


@dataclass
class Outcome:
    key: ModelKey
    images: list[bytes]
    seeds: list[int]
    width: int
    height: int
    steps: int
    queue_seconds: float
    inference_seconds: float
    encode_seconds: float
    batch_images: int
    # Token counts from the engine (pipelines.token_usage), for OpenAI's `usage`.
    usage: TokenUsage | None = None

    def log_fields(self) -> dict[str, object]:
        """The access-log fields every generation endpoint records (bounded, no prompt)."""
        return {
            "backend": self.key.backend,
            "quant_type": self.key.quant_type,
            "model": self.key.model,
            "queue_s": round(self.queue_seconds, 4),
            "inference_s": round(self.inference_seconds, 4),
            "images": len(self.images),
            "size": f"{self.width}x{self.height}",
        }


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
        )
        # GPU gauges come from the engine's allocator, not this process's.
        self.metrics.gpu_source(self.engine.gpu_readings)
        # /v1/models and request checks read the engine's cache through this mirror.
        self.cache = self.engine.models

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
    async def run(self, request: Request, params: ImageParams) -> Outcome:
        """Serve one generation request, counted in qds_inflight_requests: submit it, await
        its result (withdrawing it if the client leaves or the deadline passes), encode."""
        with self.metrics.inflight.track_inprogress():
            sub = await self.submit(request, params)
            finished = await self._wait(request, sub)
            return await self.outcome(sub, finished)

    async def submit(
        self,
        request: Request,
        params: ImageParams,
        *,
        on_event: Callable[[Any], None] | None = None,
        partial_images: int = 0,
    ) -> Submitted:
        """Check, resolve and queue a request in the engine; errors here are ordinary HTTP
        errors. With `on_event`, the job's per-step `Progress` and its `partial_images`
        previews (`service.streaming.preview_steps`) reach it on the event loop."""
        deadline = time.monotonic() + self.settings.request_timeout
        # The configured limits first: a request refused anyway must not load a model.
        check_limits(params, self.settings)
        key, variant = self.select(params.model, params.quant_backend, params.quant_type)
        allowed = (
            key == self.default_key
            or self.settings.allow_on_demand_load
            or self.cache.is_loaded(key)
            or self.cache.is_loading(key)
        )
        if not allowed:
            raise self._not_loaded(key)
        if not self.engine.accepting:
            raise ShuttingDown()
        try:
            defaults = await asyncio.wait_for(
                self.engine.ensure_loaded(key, variant, allow_load=allowed),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            raise _timeout(self.settings.request_timeout, "waiting for the model to load") from None
        except LookupError:
            raise self._not_loaded(key) from None

        gen = resolve(params, self.settings, defaults)
        if gen.lora:
            check_lora_variant(key.variant_id, self.engine.loaded.get(key))
        previews: tuple[int, ...] = ()
        if on_event is not None and partial_images:
            from service.streaming import preview_steps

            previews = preview_steps(int(gen.num_inference_steps or 0), partial_images)
        job = self.engine.submit(
            key, variant, gen, allow_load=allowed, on_event=on_event, previews=previews
        )
        return Submitted(key, params, gen, job, deadline)

    async def outcome(self, sub: Submitted, finished: Finished) -> Outcome:
        """Encode a finished job's images (on the loop if tiny, else in a thread)."""
        params = sub.params
        result = finished.result
        start = time.perf_counter()
        pixels = result.width * result.height * len(result.images)
        if pixels <= INLINE_ENCODE_PIXELS:
            images = encode_all(result.images, params.output_format, params.output_compression)
        else:
            images = await asyncio.to_thread(
                encode_all, result.images, params.output_format, params.output_compression
            )
        return Outcome(
            key=sub.key,
            images=images,
            seeds=result.seeds,
            width=result.width,
            height=result.height,
            steps=result.steps,
            queue_seconds=finished.queue_seconds,
            inference_seconds=result.inference_seconds,
            encode_seconds=time.perf_counter() - start,
            batch_images=finished.batch_images,
            usage=result.usage,
        )

    def timeout_error(self, sub: Submitted) -> errors.RequestTimeout:
        where = "while running" if sub.job.started else "while queued (removed from the queue)"
        return _timeout(self.settings.request_timeout, where)

    async def _wait(self, request: Request, sub: Submitted) -> Finished:
        """Await the job under the deadline; withdraw it if the client disconnects.

        The disconnect is awaited (one task blocked in the ASGI `receive`, which uvicorn
        answers with http.disconnect when the connection drops), not polled: polling with
        `request.is_disconnected()` every 100 ms cost each waiting request ten wake-ups a
        second, each building and cancelling an anyio cancel scope (measured at concurrency
        16); it also notices a departure at once.
        """
        job = sub.job
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            remaining = sub.deadline - time.monotonic()
            if remaining > 0:
                await asyncio.wait(
                    {job.future, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        except asyncio.CancelledError:
            # The handler itself was cancelled (forced shutdown): withdraw the job.
            self.engine.cancel(job, "shutdown")
            raise
        finally:
            gone.cancel()
        if not job.future.done():
            if gone.done() and not gone.cancelled():
                queued = self.engine.cancel(job, "client_gone")
                log.info("client left; job %s", "dropped before start" if queued else "abandoned")
                raise ClientGone
            error = self.timeout_error(sub)
            self.engine.cancel(job, "timeout")
            raise error
        return job.future.result()

    def _not_loaded(self, key: ModelKey) -> ModelNotLoaded:
        return ModelNotLoaded(
            f"{key.variant_id} is not loaded and on-demand loading is off "
            f"(QDS_ALLOW_ON_DEMAND_LOAD); loaded: {', '.join(self.loaded_ids()) or 'none'}",
            param="quant_backend",
        )


def torch_default_threads() -> int:
    """torch's intra-op thread count here: the engine process starts with the same default."""
    import torch

    return torch.get_num_threads()


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body has been read already)."""
    try:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return
            # Not uvicorn's blocking receive: fall back to polling rather than spinning.
            await asyncio.sleep(_POLL_S)
    except Exception as exc:  # never fail a request over disconnect detection
        log.debug("disconnect detection stopped: %r", exc)
        await asyncio.get_running_loop().create_future()  # until cancelled


def _timeout(limit: float, where: str) -> errors.RequestTimeout:
    return errors.RequestTimeout(
        f"request timed out after {limit:g}s (QDS_REQUEST_TIMEOUT) {where}"
    )
