"""The service's state and the request path shared by every generation endpoint.

request -> pick the cache variant -> lease it (single-flight load) -> check the size against
the model -> enqueue a job for the worker -> await it under the deadline (cancelling it if
the client leaves) -> encode the images (on the loop if tiny, else in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantization.backends import BackendUnavailable
from quantization.generate import GenerationRequest, batch_key, generate
from quantization.loader import ModelLoadError, load_pipeline
from quantization.settings import QuantSettings
from service import exceptions as errors
from service.cache import ModelCache
from service.imaging import encode_all
from service.metrics import Metrics
from service.resolve import ImageParams, check_limits, resolve
from service.settings import ServiceSettings
from service.variants import ModelKey, Variants, key_for
from service.worker import (
    InferenceWorker,
    Job,
    JobResult,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
)

if TYPE_CHECKING:
    from fastapi import Request

    from quantization.loader import LoadedPipeline

log = logging.getLogger("qdserve.engine")

# Fallback disconnect polling period, only for an ASGI server whose `receive` answers at once
# with something other than a disconnect once the body is read (uvicorn blocks until then).
_POLL_S = 0.1
# Results of at most this many pixels (all images together) are encoded on the event loop
# (a noisy 32x32 PNG: ~0.2 ms; 128x128: ~1.4 ms, the most the loop is held): cheaper than the
# hop to a thread and back, whose GIL hand-offs slow the running pipeline call. Larger ones go
# to a thread (PNG level 1: ~56 ms for 1024x1024), where Pillow's encoder releases the GIL.
INLINE_ENCODE_PIXELS = 128 * 128
WARMUP_STEPS = 2


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing will read the answer."""


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


def default_warmup(loaded: LoadedPipeline, sizes: list[tuple[int, int]]) -> None:
    """One short generation per size, so compilation happens before the first user request."""
    for width, height in sizes:
        start = time.perf_counter()
        generate(
            loaded,
            GenerationRequest(
                "warm-up", num_inference_steps=WARMUP_STEPS, seed=0, width=width, height=height
            ),
        )
        log.info("warm-up %dx%d took %.1fs", width, height, time.perf_counter() - start)


def compile_denoiser(loaded: LoadedPipeline) -> None:
    """Regional compilation: compile one repeated block once, reuse it for all of them."""
    pipe = loaded.pipeline
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None or not hasattr(denoiser, "compile_repeated_blocks"):
        raise ModelLoadError("QDS_COMPILE=1 but this pipeline's denoiser has no repeated blocks")
    denoiser.compile_repeated_blocks()


@dataclass
class ServiceState:
    quant: QuantSettings
    settings: ServiceSettings
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    reason: str = "starting"
    warnings: list[str] = field(default_factory=list)
    # Hooks, replaceable before start-up (tests, benchmarks).
    warmup: Callable[[LoadedPipeline, list[tuple[int, int]]], None] = default_warmup
    compile: Callable[[LoadedPipeline], None] = compile_denoiser
    load: Callable[[QuantSettings], LoadedPipeline] = load_pipeline

    def __post_init__(self) -> None:
        self.variants = Variants(self.quant)
        self.default_key = self.variants.default_key
        self.model_id = self.variants.model_id
        self.preload_variants: dict[ModelKey, QuantSettings] = {}
        self.cache = ModelCache(
            self._load_variant,
            max_entries=self.settings.cache_max_entries,
            memory_budget=self.settings.cache_memory_budget,
            metrics=self.metrics,
            on_loaded=self._on_loaded,
        )
        self.worker = InferenceWorker(
            max_queue=self.settings.max_queue,
            batch_window_s=self.settings.batch_window_ms / 1000.0,
            max_batch=self.settings.max_batch,
            metrics=self.metrics,
        )
        self._startup_done = threading.Event()
        self._startup_thread: threading.Thread | None = None

    # -- start-up / shut-down ----------------------------------------------------------
    def warmup_sizes(self, loaded: LoadedPipeline) -> list[tuple[int, int]]:
        sizes = [tuple(int(v) for v in s.split("x")) for s in self.settings.warmup_sizes]
        return [(w, h) for w, h in sizes] or [(loaded.defaults.size, loaded.defaults.size)]

    def _load_variant(self, settings: QuantSettings) -> LoadedPipeline:
        loaded = self.load(settings)
        try:
            if self.settings.compile:
                self.compile(loaded)
            if self.settings.compile or self.settings.warmup_sizes:
                if key_for(settings) == self.default_key and not self._startup_done.is_set():
                    self._set_reason(
                        "warming up "
                        + ", ".join(self.settings.warmup_sizes or ["the default size"])
                    )
                self.warmup(loaded, self.warmup_sizes(loaded))
        except BaseException:
            loaded.release()
            raise
        return loaded

    def _on_loaded(self, key: ModelKey, _loaded: LoadedPipeline) -> None:
        # A default model that failed at start-up and later loads on a request: ready now.
        if key == self.default_key and self._startup_done.is_set() and not self.ready:
            self._set_ready()

    def _set_reason(self, reason: str) -> None:
        self.reason = reason
        log.info("not ready: %s", reason)

    def _set_ready(self) -> None:
        self.ready = True
        self.reason = "ready"
        self.metrics.model_ready.set(1)
        log.info("ready: serving %s", self.default_key.variant_id)

    def start(self) -> None:
        """Start the worker, and load the default model (and preloads) in the background."""
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.worker.start()
        self.preload_variants, warnings = self.variants.preload(self.settings.preload)
        self.warnings.extend(warnings)
        self._startup_thread = threading.Thread(
            target=self._startup, name="qds-startup", daemon=True
        )
        self._startup_thread.start()

    def _startup(self) -> None:
        self._set_reason(f"loading {self.default_key.variant_id}")
        try:
            self.cache.load(self.default_key, self.quant).result()
        except Exception as exc:
            self._set_reason(f"loading {self.default_key.variant_id} failed: {exc}")
            log.error("default model failed to load: %s", exc)
            self._startup_done.set()
            return
        for key, variant in self.preload_variants.items():
            try:
                self.cache.load(key, variant).result()
            except Exception as exc:
                msg = f"preloading {key.variant_id} failed: {exc}"
                self.warnings.append(msg)
                log.warning(msg)
        self._startup_done.set()
        self._set_ready()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._startup_done.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        self.ready = False
        self.reason = "shutting down"
        self.metrics.model_ready.set(0)
        self.worker.stop(timeout)
        self.cache.close()

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
        """Serve one generation request (see `_run`), counted in qds_inflight_requests."""
        with self.metrics.inflight.track_inprogress():
            return await self._run(request, params)

    async def _run(self, request: Request, params: ImageParams) -> Outcome:
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
        if not self.worker.accepting:
            raise errors.ShuttingDown()
        try:
            lease = await asyncio.wait_for(
                self.cache.acquire(key, variant, allow_load=allowed),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            raise _timeout(self.settings.request_timeout, "waiting for the model to load") from None
        except LookupError:
            raise self._not_loaded(key) from None
        except BackendUnavailable as exc:
            raise errors.BackendUnavailable(str(exc), param="quant_backend") from None
        except (ModelLoadError, ValueError, RuntimeError, OSError) as exc:
            raise errors.ModelLoadFailed(f"loading {key.variant_id} failed: {exc}") from None

        job: Job | None = None
        try:
            loaded = lease.loaded
            gen = resolve(params, self.settings, loaded.defaults)
            loop = asyncio.get_running_loop()
            job = Job(
                request=gen,
                lease=lease,
                batch_key=(key, batch_key(loaded, gen)),
                loop=loop,
                future=loop.create_future(),
                request_id=getattr(request.state, "request_id", None),
            )
            try:
                self.worker.submit(job)
            except QueueFull as exc:
                raise errors.QueueFull(
                    f"the queue is full ({self.settings.max_queue} waiting); retry after "
                    f"{exc.retry_after}s",
                    retry_after=exc.retry_after,
                ) from None
            except ShuttingDown:
                raise errors.ShuttingDown() from None
            result = await self._wait(request, job, deadline)
        finally:
            # Until the worker owns the job, the lease is ours to give back.
            if job is None or job.state == "new":
                lease.release()

        start = time.perf_counter()
        pixels = result.result.width * result.result.height * len(result.result.images)
        if pixels <= INLINE_ENCODE_PIXELS:
            images = encode_all(
                result.result.images, params.output_format, params.output_compression
            )
        else:
            images = await asyncio.to_thread(
                encode_all, result.result.images, params.output_format, params.output_compression
            )
        return Outcome(
            key=key,
            images=images,
            seeds=result.result.seeds,
            width=result.result.width,
            height=result.result.height,
            steps=result.result.steps,
            queue_seconds=result.queue_seconds,
            inference_seconds=result.result.inference_seconds,
            encode_seconds=time.perf_counter() - start,
            batch_images=result.batch_images,
        )

    async def _wait(self, request: Request, job: Job, deadline: float) -> JobResult:
        """Await the job under the deadline; withdraw it if the client disconnects.

        The disconnect is awaited (one task blocked in the ASGI `receive`, which uvicorn
        answers with http.disconnect when the connection drops), not polled: polling with
        `request.is_disconnected()` every 100 ms cost each waiting request ten wake-ups a
        second, each building and cancelling an anyio cancel scope under the GIL the
        pipeline needs (measured at concurrency 16); it also notices a departure at once.
        """
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                await asyncio.wait(
                    {job.future, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        except asyncio.CancelledError:
            # The handler itself was cancelled (forced shutdown): withdraw the job.
            self.worker.cancel(job)
            raise
        finally:
            gone.cancel()
        if not job.future.done():
            if gone.done() and not gone.cancelled():
                removed = self.worker.cancel(job)
                log.info("client left; job %s", "dropped before start" if removed else "abandoned")
                raise ClientGone
            started = not self.worker.cancel(job)
            raise _timeout(
                self.settings.request_timeout,
                "while running" if started else "while queued (removed from the queue)",
            )
        try:
            return job.future.result()
        except OutOfMemory as exc:
            raise errors.OutOfMemory(
                f"out of memory while generating ({exc}); memory was released and the service "
                "keeps serving: retry with fewer images, a smaller size or a smaller quant type"
            ) from None
        except ShuttingDown:
            raise errors.ShuttingDown() from None

    def _not_loaded(self, key: ModelKey) -> errors.ModelNotLoaded:
        return errors.ModelNotLoaded(
            f"{key.variant_id} is not loaded and on-demand loading is off "
            f"(QDS_ALLOW_ON_DEMAND_LOAD); loaded: {', '.join(self.loaded_ids()) or 'none'}",
            param="quant_backend",
        )


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
