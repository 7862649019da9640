"""The engine core: the loop that owns the model cache, the scheduler and the step batches.

In production it is the main thread of its own process (`run_engine`, started by
`engine.client.EngineClient` with the "spawn" context); with `QDS_ENGINE=inline` (tests,
debugging) the same loop runs on a thread of the HTTP process. Each iteration:

1. reads every message waiting on the pipe (blocking only when there is nothing to step):
   `Load`, `Submit`, `Cancel`, `Stop`, `Query`;
2. takes finished loads (they run on the cache's load thread, which wakes the loop);
3. admits queued jobs into running batches (the step boundary);
4. runs one step of one batch;
5. sends what happened (started, finished, failed, cancelled, loaded, evicted, status, metric
   operations) as one list in one pipe message.

The loop moves messages and decides nothing about models itself: the scheduler decides what
runs (`engine.scheduler`) and a batch runs it (`engine.batches`); the cache's loader, with the
compile and warm-up policy, is `engine.preparing.Preparer` (on the load thread); start-up
state and what /readyz says is `engine.readiness.Readiness`, whose decisions (a status to
send, the preloads to start) the loop carries out. Here: the wiring, the pipe, the pending
loads and their waiting requests, telemetry and `stats()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from engine import messages as m
from engine.batches import compat_key, new_batch, uses_stepping
from engine.cache import ModelCache
from engine.compiling import compile_denoiser, default_warmup
from engine.failures import (
    BackendUnavailable,
    Failure,
    ModelLoadFailed,
    ModelNotLoaded,
    ShuttingDown,
    load_failed,
)
from engine.gpu_memory import local_readings
from engine.keys import key_for
from engine.preparing import Preparer, Reports
from engine.readiness import Readiness
from engine.scheduler import BatchFactory, Job, KindOf, Scheduler
from engine.startup import (
    compiler_of,
    configure_compile_cache,
    configure_kernel_threads,
    stop_all,
)
from engine.telemetry import MetricsRecorder
from pipelines import lora
from pipelines.loader import load_pipeline
from pipelines.prompt_cache import PromptCache
from pipelines.quality_guard import QualityRefused

if TYPE_CHECKING:
    import concurrent.futures

    from engine.keys import ModelKey
    from engine.startup import BackgroundCompiler, Mode
    from pipelines.loader import LoadedPipeline
    from quantization.settings import QuantSettings
    from service.settings import ServiceSettings

log = logging.getLogger("qdserve.engine_core")

# Resident memory and GPU readings are sent at most this often while busy, after each load
# or eviction, and when the engine goes idle.
TELEMETRY_PERIOD_S = 1.0
DEFAULT_PROMPT_CACHE_BYTES = 64 * 2**20
# At close, how long to wait for a background compile that is under way.
COMPILE_STOP_WAIT_S = 2.0


@dataclass
class EngineHooks:
    """Replaceable before start-up (tests, benchmarks). With the engine in its own process
    they travel by pickle, so they must be module-level functions there."""

    load: Callable[[QuantSettings], LoadedPipeline] = load_pipeline
    warmup: Callable[..., None] = default_warmup
    compile: Callable[[LoadedPipeline, str], None] = compile_denoiser
    before_batch: Callable[[list[Job]], None] | None = None
    make_batch: BatchFactory = new_batch
    kind_of: KindOf = compat_key


@dataclass
class EngineConfig:
    quant: QuantSettings  # the default variant
    settings: ServiceSettings
    preload: dict[ModelKey, QuantSettings] = field(default_factory=dict)
    hooks: EngineHooks = field(default_factory=EngineHooks)


@dataclass
class _PendingLoad:
    future: concurrent.futures.Future
    jobs: list[m.Submit] = field(default_factory=list)


class EngineCore:
    def __init__(self, config: EngineConfig, conn: Connection) -> None:
        self.config = config
        self.settings = config.settings
        self.hooks = config.hooks
        self.conn = conn
        self.default_key = key_for(config.quant)
        self.metrics = MetricsRecorder()
        self.prompt_cache = PromptCache(
            int(getattr(self.settings, "prompt_cache_bytes", DEFAULT_PROMPT_CACHE_BYTES))
        )
        lanes = self.settings.engine_lanes if isinstance(self.settings.engine_lanes, int) else 1
        # Start-up state and /readyz (engine.readiness): it decides, this loop sends.
        self.readiness = Readiness(self.default_key, config.preload, self.metrics)
        # The cache's loader and the compile policy (engine.preparing), run on the load
        # thread; it reports back through these callables, not through this object.
        self.preparer = Preparer(
            self.settings,
            self.hooks,
            default_key=self.default_key,
            lanes=lanes,
            reports=Reports(
                is_starting=self.readiness.is_starting,
                status=self._status,
                warn=self.readiness.warn,
                warn_once=self.readiness.warn_once,
                mode_changed=self._mode_changed,
            ),
        )
        self.cache = ModelCache(
            self.preparer.load,
            max_entries=self.settings.cache_max_entries,
            memory_budget=self.settings.cache_memory_budget,
            metrics=self.metrics,
            on_loaded=self._on_loaded,
            on_evicted=self._on_evicted,
            # On-demand loads never push out the model /readyz is about.
            protected=frozenset({self.default_key}),
        )
        self.scheduler = Scheduler(
            max_batch=self.settings.max_batch,
            lanes=lanes,
            emit=self._emit,
            metrics=self.metrics,
            prompt_cache=self.prompt_cache,
            make_batch=self.hooks.make_batch,
            kind_of=self.hooks.kind_of,
        )
        self.scheduler.before_batch = self.hooks.before_batch
        self.scheduler.between_steps = self._between_steps
        self._outbox: list[object] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._main = threading.get_ident()
        self._pending: dict[ModelKey, _PendingLoad] = {}
        self._forwards_seen = {"compiled": 0, "eager": 0}
        self._stopping = False
        self._closed = False
        self._sigterm = False
        self._telemetry_due = 0.0
        self._telemetry_stale = False
        self._prompt_seen = (0, 0)
        self.compiles_done = True

    # -- life cycle --------------------------------------------------------------------------
    def run(self) -> None:
        self._main = threading.get_ident()
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self._emit(self.readiness.begin())
        self._watch_load(self.default_key, self.config.quant)
        try:
            while self._iterate():
                pass
        finally:
            self._close()

    def _iterate(self) -> bool:
        if self._stopping and not self.scheduler.has_work():
            self._flush()
            return False
        if not self._receive(block=not self.scheduler.has_work()):
            return False
        if self._sigterm and not self._stopping:
            log.info("SIGTERM: finishing running requests, then exiting")
            self._stop(cancel_running=False)
        self._check_loads()
        self.scheduler.admit()
        if self._outbox_pending():
            # "started" before a step that may take seconds (a GPU at 1024x1024)
            self._flush()
        self.scheduler.step_next()
        self._flush()
        return not self._closed

    def _close(self) -> None:
        # Background compiles stop first (one mid-compile finishes on its own; see run_engine).
        self.compiles_done = stop_all(COMPILE_STOP_WAIT_S)
        self.scheduler.fail_queued(ShuttingDown())
        self.scheduler.cancel_running("shutdown")
        with contextlib.suppress(Exception):
            self._flush()
        self.cache.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        with contextlib.suppress(OSError):
            self.conn.close()

    def on_sigterm(self) -> None:
        """Signal handler (engine process): stop like `Stop()`; the HTTP process decides."""
        self._sigterm = True
        self._wake()

    # -- messages in -------------------------------------------------------------------------
    def _receive(self, *, block: bool) -> bool:
        """Handle every waiting message; False when the HTTP side has gone (pipe closed)."""
        if block and not self._outbox_pending():
            if self._telemetry_stale:
                # Going idle: what the last steps did (memory, prompt cache) is reported now,
                # not at the next request.
                self._telemetry_due = 0.0
                self._flush()
            # Idle, a sign of life once a period: the HTTP side's watchdog tells a stopped
            # or deadlocked engine from an idle one by it (engine.client).
            if not wait([self.conn, self._wake_r], timeout=TELEMETRY_PERIOD_S):
                self._emit(m.Alive())
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            log.info("the HTTP process closed the pipe; exiting")
            self._closed = True
            return False
        return True

    def _between_steps(self) -> None:
        """During a whole pipeline call: read cancellations (and everything else) and send
        what is due, so a client gone mid-call is noticed at the next diffusers step."""
        if self._receive(block=False):
            self._flush()

    def _handle(self, msg: object) -> None:
        if isinstance(msg, m.Submit):
            self._submit(msg)
        elif isinstance(msg, m.Cancel):
            self._cancel(msg)
        elif isinstance(msg, m.Load):
            self._load(msg)
        elif isinstance(msg, m.Stop):
            self._stop(msg.cancel_running)
        elif isinstance(msg, m.Query):
            self._emit(m.Answer(msg.token, self.stats()))
        else:
            log.warning("unknown message %r", type(msg).__name__)

    def _load(self, msg: m.Load) -> None:
        if self._stopping:
            self._emit(m.LoadFailed(msg.key, ShuttingDown()))
            return
        entry = next((e for e in self.cache.entries() if e.key == msg.key), None)
        if entry is not None:
            self._emit(_loaded_event(msg.key, entry.loaded, entry.loaded_at))
            return
        self.metrics.cache_misses.inc()
        self._watch_load(msg.key, msg.settings)

    def _submit(self, msg: m.Submit) -> None:
        if self._stopping:
            self._emit(m.Failed(msg.job_id, ShuttingDown()))
            return
        lease = self.cache.lease(msg.key)
        if lease is not None:
            job = Job(
                msg.job_id,
                msg.key,
                msg.request,
                lease,
                progress=msg.progress,
                previews=tuple(msg.previews),
                owner=msg.owner,
            )
            self.scheduler.enqueue(job)
            return
        if not msg.allow_load and not self.cache.is_loading(msg.key):
            self._emit(
                m.Failed(
                    msg.job_id,
                    ModelNotLoaded(f"{msg.key.variant_id} is not loaded", param="quant_backend"),
                )
            )
            return
        self.metrics.cache_misses.inc()
        self._watch_load(msg.key, msg.settings).jobs.append(msg)

    def _cancel(self, msg: m.Cancel) -> None:
        for pending in self._pending.values():
            for sub in pending.jobs:
                if sub.job_id == msg.job_id:
                    pending.jobs.remove(sub)
                    self.scheduler.cancelled[msg.reason] += 1
                    self.metrics.cancelled.labels(msg.reason).inc()
                    self._emit(m.Cancelled(msg.job_id, "queued", 0))
                    return
        self.scheduler.cancel(msg.job_id, msg.reason)

    def _stop(self, cancel_running: bool) -> None:
        self._stopping = True
        self._emit(self.readiness.stop())
        self.scheduler.fail_queued(ShuttingDown())
        for pending in self._pending.values():
            for sub in pending.jobs:
                self._emit(m.Failed(sub.job_id, ShuttingDown()))
            pending.jobs.clear()
        self._pending.clear()
        if cancel_running:
            self.scheduler.cancel_running("shutdown")

    # -- loading -----------------------------------------------------------------------------
    def _watch_load(self, key: ModelKey, settings: QuantSettings) -> _PendingLoad:
        pending = self._pending.get(key)
        if pending is None:
            future = self.cache.load(key, settings)
            pending = self._pending[key] = _PendingLoad(future)
            if not future.done():
                self._emit(m.Loading(key))
            future.add_done_callback(lambda _f: self._wake())
        return pending

    def _check_loads(self) -> None:
        for key, pending in list(self._pending.items()):
            if not pending.future.done():
                continue
            del self._pending[key]
            exc = pending.future.exception()
            if exc is None:
                for sub in pending.jobs:
                    self._submit(sub)
                after = self.readiness.loaded(key)
                for variant_key, variant in after.preloads.items():
                    self._watch_load(variant_key, variant)
                self._send_status(after.status)
            else:
                failure = _load_failure(key, exc)
                self._emit(m.LoadFailed(key, failure))
                for sub in pending.jobs:
                    self._emit(m.Failed(sub.job_id, failure))
                self._send_status(
                    self.readiness.load_failed(key, str(exc) or type(exc).__name__, _public(exc))
                )

    def _on_loaded(self, key: ModelKey, loaded: LoadedPipeline) -> None:
        self._emit(_loaded_event(key, loaded, time.time()))
        self._telemetry_due = 0.0

    def _on_evicted(self, key: ModelKey, loaded: LoadedPipeline) -> None:
        compiler = compiler_of(loaded)
        if compiler is not None:
            compiler.stop()
        if uses_stepping(loaded):
            from pipelines.stepping import variant_id

            self.prompt_cache.drop_variant(variant_id(loaded))
        self._emit(m.Evicted(key))
        self._telemetry_due = 0.0

    # -- messages out ------------------------------------------------------------------------
    def _status(self, reason: str) -> None:
        """A new /readyz reason (also from the load thread: `_emit` is thread-safe)."""
        self._emit(self.readiness.status(reason))

    def _mode_changed(self, key: ModelKey, mode: Mode) -> None:
        """A variant's serving mode changed (load or compile thread)."""
        self._send_status(self.readiness.mode_changed(key, mode))

    def _send_status(self, status: m.Status | None) -> None:
        if status is not None:
            self._emit(status)

    def _emit(self, event: object) -> None:
        with self._lock:
            self._outbox.append(event)
        if threading.get_ident() != self._main:
            self._wake()

    def _outbox_pending(self) -> bool:
        with self._lock:
            return bool(self._outbox)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _flush(self) -> None:
        now = time.monotonic()
        due = now >= self._telemetry_due
        if due:
            self._telemetry_due = now + TELEMETRY_PERIOD_S
            self._telemetry_stale = False
            self._telemetry()
        else:
            self._telemetry_stale = True
        with self._lock:
            events, self._outbox = self._outbox, []
        if not events and not due:
            # Metric updates alone (a step's duration) wait for the next events or the next
            # telemetry tick instead of a pipe write per step: those writes were 2% of the
            # engine's time at concurrency 1. A job's own metrics still reach the HTTP
            # process with its Finished event, before its response is sent.
            return
        self._prompt_cache_counts()
        ops = self.metrics.drain()
        if ops:
            events.append(m.Metrics(ops))
        if not events and self.scheduler.has_work():
            events.append(m.Alive())  # the stall watchdog's sign of life (core.client)
        if not events or self._closed:
            return
        try:
            self.conn.send(events)
        except (BrokenPipeError, EOFError, OSError):
            log.info("the HTTP process closed the pipe; exiting")
            self._closed = True

    def _prompt_cache_counts(self) -> None:
        """The prompt cache's counters since the last report (two integer reads)."""
        hits, misses = self.prompt_cache.hits, self.prompt_cache.misses
        seen_hits, seen_misses = self._prompt_seen
        if (hits, misses) == (seen_hits, seen_misses):
            return
        if hits > seen_hits:
            self.metrics.prompt_cache_hits.inc(hits - seen_hits)
        if misses > seen_misses:
            self.metrics.prompt_cache_misses.inc(misses - seen_misses)
        self._prompt_seen = (hits, misses)
        self.metrics.prompt_cache_bytes.set(self.prompt_cache.bytes)

    def _telemetry(self) -> None:
        """Readings that cost a system call or a CUDA query: at most once a second."""
        self._forward_counts()
        rss = _resident_bytes()
        if rss is not None:
            self.metrics.engine_memory.set(rss)
        readings = local_readings()
        if readings:
            self._emit(m.Gpu(readings))

    def _default_compiler(self) -> BackgroundCompiler | None:
        entry = next((e for e in self.cache.entries() if e.key == self.default_key), None)
        return compiler_of(entry.loaded) if entry is not None else None

    def _forward_counts(self) -> None:
        """Denoiser forwards by path (compiled graph or eager) since the last report."""
        compiler = self._default_compiler()
        if compiler is None:
            return
        for path, count in list(compiler.forwards.items()):
            seen = self._forwards_seen.get(path, 0)
            if count > seen:
                self.metrics.denoiser_forwards.labels(path).inc(count - seen)
                self._forwards_seen[path] = count

    def stats(self) -> dict[str, Any]:
        compiler = self._default_compiler()
        return {
            "mode": self.readiness.mode,
            "compile": compiler.stats() if compiler is not None else None,
            **self.scheduler.stats(),
            "pid": os.getpid(),
            "loaded": [k.variant_id for k in self.cache.loaded_keys()],
            "load_counts": {k.variant_id: n for k, n in self.cache.load_counts.items()},
            "prompt_cache": self.prompt_cache.stats(),
            "ready": self.readiness.ready,
            "reason": self.readiness.reason,
            "gpu": local_readings(),
        }


def _loaded_event(key: ModelKey, loaded: LoadedPipeline, loaded_at: float) -> m.Loaded:
    adapters = lora.adapters_of(loaded)
    return m.Loaded(
        key,
        loaded.defaults,
        loaded_at,
        loaded.storage_bytes,
        tuple(loaded.components),
        loras=tuple(adapters.describe()) if adapters is not None else (),
        lora_error=str(getattr(loaded, "extra", {}).get("lora_error", "")),
        plan=_plan_card(getattr(loaded, "extra", {}).get("plan")),
    )


def _plan_card(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    if not plan:
        return None
    from quantization.planning.render import plan_card

    return plan_card(plan)


def _public(exc: BaseException) -> bool:
    """A load failure whose text is this package's own refusal (a backend this machine
    cannot run, QDS_LORAS on a backend without LoRA, the quality guard's PSNR verdict): no
    paths, no hosts, and it says what to change, so clients and /readyz may see it."""
    from quantization.backends import BackendUnavailable as Unavailable

    return isinstance(exc, (Unavailable, lora.LoraUnsupported, QualityRefused))


def _load_failure(key: ModelKey, exc: BaseException) -> Failure:
    """A failed load as the typed failure its waiters get."""
    from quantization.backends import BackendUnavailable as Unavailable

    if isinstance(exc, Unavailable):
        return BackendUnavailable(str(exc), param="quant_backend")
    if isinstance(exc, lora.LoraUnsupported):
        return ModelLoadFailed(f"loading {key.variant_id} failed: {exc}")
    return load_failed(key.variant_id, str(exc) or type(exc).__name__)


def _resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run_engine(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the engine process: its main thread runs the loop.

    SIGINT is ignored (Ctrl-C reaches the whole process group; the HTTP process drains and
    then stops the engine); SIGTERM finishes the running batches and exits.
    """
    from engine.logs import configure_logging

    configure_logging(config.settings.log_level, config.settings.log_format)
    # The engine process's own environment (not the HTTP process's: QDS_ENGINE=inline keeps
    # whatever the host process set).
    chosen = configure_compile_cache(getattr(config.quant, "cache_dir", None))
    configure_kernel_threads(config.settings.compile_shared_threads)
    if chosen:
        log.info("compile caches: %s", ", ".join(f"{k}={v}" for k, v in chosen.items()))
    core = EngineCore(config, conn)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: core.on_sigterm())
    core.run()
    if not core.compiles_done:
        # A background compile is still running: the interpreter's exit would abort under it
        # (C++ threads alive at static destruction), so leave without one. The pipe is closed
        # and every request answered by now.
        log.info("exiting during a background compile")
        logging.shutdown()
        os._exit(0)
