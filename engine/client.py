"""The HTTP process's side of the engine: start it, talk to it, notice when it dies.

`EngineClient` starts the engine core (`QDS_ENGINE=process`: a "spawn" process whose main thread
runs the loop; `inline`: a thread here, for tests and debugging), sends it `Load` / `Submit` /
`Cancel` / `Stop` through a sender thread (a send never blocks the event loop, even when the
engine is deep in a step and the pipe is full), and reads its events on a reader thread that
hands them to the event loop. It keeps a mirror of what the engine has loaded (for
`/v1/models`, `/readyz` and request validation), the jobs in flight (their asyncio futures),
and applies the engine's metric operations to this process's registry.

When the pipe reaches end-of-file without a `Stop`, the engine died (killed, segfault,
out-of-memory killer): every waiting request fails at once with `EngineUnavailable` ("the
engine process died (signal 9, SIGKILL); restarting") -> 503, readiness turns 503 with that
reason, and a new engine is started (at once the first time, then with a growing delay if it
keeps dying young); readiness returns when it has loaded the default model again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from engine import messages as m
from engine.core import EngineConfig, EngineCore, run_engine
from engine.failures import EngineUnavailable, QueueFull, ShuttingDown
from engine.telemetry import apply

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from engine.gpu_memory import GpuReadings
    from engine.keys import ModelKey
    from pipelines.generate import GenerationRequest
    from pipelines.loader import ModelDefaults
    from quantization.settings import QuantSettings
    from service.metrics import Metrics

log = logging.getLogger("qdserve.engine_client")

EngineMode = Literal["process", "inline"]
# A restarted engine that dies within this many seconds of starting waits longer before the
# next start (1 s, doubling up to MAX_RESTART_DELAY_S): a crash loop must not spin.
YOUNG_DEATH_S = 60.0
MAX_RESTART_DELAY_S = 30.0
# How long a new engine process may take to say its first word (importing torch, diffusers).
START_TIMEOUT_S = 120.0
# The stall watchdog running this much later than scheduled means this process was not
# running either (stopped, paused, starved): that time is not the engine's silence.
WATCH_LATE_S = 2.0
# Retry-After of the 503s a dead or hung engine answers with: about one restart (the demo model
# is back in ~12 s on a CPU).
RESTART_RETRY_AFTER_S = 10


@dataclass(eq=False)
class PendingJob:
    job_id: str
    key: ModelKey
    images: int
    future: asyncio.Future[m.Finished]
    # Called on the event loop with the job's `Progress` and `Preview` events (streaming).
    on_event: Callable[[m.Progress | m.Preview], None] | None = None
    started: bool = False
    owner: str = ""  # an API key's position ("" without keys)


@dataclass
class LoadedView:
    """What `/v1/models` shows of a loaded variant (duck-types `engine.cache.Entry`)."""

    key: ModelKey
    loaded_at: float
    storage_bytes: int
    in_use: int
    components: tuple[str, ...]
    loras: tuple[dict[str, Any], ...] = ()
    lora_error: str = ""
    plan: dict[str, Any] | None = None


class ModelsView:
    """The engine's model cache as this process sees it (the queries routes need)."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client

    def entries(self) -> list[LoadedView]:
        c = self._client
        return [
            LoadedView(
                key,
                e.loaded_at,
                e.storage_bytes,
                c.in_use(key),
                e.components,
                e.loras,
                e.lora_error,
                e.plan,
            )
            for key, e in c.loaded.items()
        ]

    def loaded_keys(self) -> list[ModelKey]:
        return list(self._client.loaded)

    def is_loaded(self, key: ModelKey) -> bool:
        return key in self._client.loaded

    def is_loading(self, key: ModelKey) -> bool:
        return key in self._client.loading

    def total_bytes(self) -> int:
        return sum(e.storage_bytes for e in self._client.loaded.values())


class EngineClient:
    def __init__(
        self,
        config: EngineConfig,
        *,
        mode: EngineMode,
        metrics: Metrics,
        max_queue: int,
        max_queue_per_owner: int | None = None,
    ) -> None:
        self.config = config
        self.mode = mode
        self.metrics = metrics
        self.max_queue = max_queue
        # Jobs one owner (API key) may have waiting; None: no bound beyond max_queue.
        self.max_queue_per_owner = max_queue_per_owner
        self.models = ModelsView(self)
        self.loaded: dict[ModelKey, m.Loaded] = {}
        self.loading: set[ModelKey] = set()
        # Kept after an eviction: a variant's defaults do not change.
        self.defaults: dict[ModelKey, ModelDefaults] = {}
        self.reason = "starting"
        self.warnings: list[str] = []
        self.serving_mode = "eager"  # the default model's denoiser (engine.startup)
        self.restarts = 0
        self.pid: int | None = None
        self.core: EngineCore | None = None  # inline mode: the core itself (tests)
        self._engine_ready = False
        self._alive = False
        self._stopping = False
        self._jobs: dict[str, PendingJob] = {}
        self._load_waiters: dict[ModelKey, asyncio.Future[m.Loaded]] = {}
        self._queries: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._gpu: GpuReadings = {}
        self._ids = itertools.count(1)
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: BaseProcess | threading.Thread | None = None
        self._outq: queue.SimpleQueue[object] | None = None
        self._started_at = 0.0
        self._restart_delay = 0.0
        self._job_seconds = 1.0
        self._last_word = 0.0  # when the current engine last sent anything
        self._stall: str | None = None  # why the watchdog killed the current engine
        self._heard = False  # the current engine has sent something (it has started)
        self._loading_since: dict[ModelKey, float] = {}
        self._watch_due = 0.0  # when the stall watchdog's next look is due (monotonic)
        self._pipe_closed = threading.Event()  # the current engine closed its end

    # -- state -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._engine_ready and self._alive and not self._stopping

    @property
    def accepting(self) -> bool:
        return not self._stopping

    def depth(self) -> int:
        """Jobs submitted that have not started (the queue the HTTP side admits against)."""
        return sum(1 for j in self._jobs.values() if not j.started)

    def depth_of(self, owner: str) -> int:
        """Jobs of one owner submitted that have not started."""
        return sum(1 for j in self._jobs.values() if not j.started and j.owner == owner)

    def check_room(self, owner: str = "") -> None:
        """Raise QueueFull (with Retry-After) unless a job of `owner` would be admitted now:
        the queue has room, and the owner (an API key; "" = no keys) holds fewer than its
        bound, so one key can never take the whole queue while others wait. Cheap: called
        before an upload is decoded, and again at submission."""
        depth = self.depth()
        full = depth >= self.max_queue
        per_owner = self.max_queue_per_owner
        mine = self.depth_of(owner) if owner and per_owner else 0
        if not full and not (owner and per_owner and mine >= per_owner):
            return
        # A rough wait: the queued jobs at the recent pace, batched, rounded up.
        batch = max(1, self.config.settings.max_batch)
        waits = ((depth if full else mine) + 1) / batch * self._job_seconds
        retry = max(1, int(waits + 0.999))
        if full:
            message = f"the queue is full ({self.max_queue} waiting); retry after {retry}s"
        else:
            message = (
                f"this API key has {mine} requests waiting, its share of the queue "
                f"(QDS_MAX_QUEUE_PER_KEY={per_owner}); retry after {retry}s"
            )
        raise QueueFull(message, retry_after=retry)

    def in_use(self, key: ModelKey) -> int:
        return sum(1 for j in self._jobs.values() if j.key == key)

    def gpu_readings(self) -> GpuReadings:
        return self._gpu

    # -- life cycle --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spawn()
        self._watch_stalls()

    def _watch_stalls(self) -> None:
        """Every few seconds: an engine process that has said nothing for
        QDS_ENGINE_STALL_TIMEOUT is hung (stopped, deadlocked, a step that never returns).
        It reports in once a second while it has work and once a second when idle, so
        silence means the same whether requests are queued, running or none at all. A load
        older than QDS_MODEL_LOAD_TIMEOUT is hung too (loads run one at a time: it would block
        every later one). Either way: readiness 503 at once, every waiting request 503 with
        Retry-After, then the engine is killed and the crash path restarts it. A thread engine
        (inline mode) cannot be killed and is left alone."""
        limit = self.config.settings.engine_stall_timeout
        load_limit = getattr(self.config.settings, "model_load_timeout", 0.0)
        if self._stopping or (not limit and not load_limit) or self.mode != "process":
            return
        handle = self._handle
        is_process = handle is not None and not isinstance(handle, threading.Thread)
        now = time.monotonic()
        late = now - self._watch_due if self._watch_due else 0.0
        if late > WATCH_LATE_S:
            # This process did not run either for that long: the whole service was stopped
            # (SIGSTOP of its process group, a paused VM or container) or starved. The engine's
            # silence over that time is not its own, so it does not count (without this, the
            # peer benchmark's pausing of the server not being measured restarted the engine).
            self._last_word += late
            self._loading_since = {k: t + late for k, t in self._loading_since.items()}
        why = None
        if self._alive and is_process and not self._stall:
            silent = now - self._last_word
            if not self._heard:
                # Still importing torch and the pipelines (seconds; more on a busy machine):
                # a generous bound of its own.
                start_limit = max(load_limit, limit, START_TIMEOUT_S)
                if silent > start_limit:
                    why = f"the engine process did not start in {silent:.0f} s"
            elif limit and silent > limit:
                work = "with requests waiting" if self._jobs else "while idle"
                why = (
                    f"the engine sent no sign of life for {silent:.0f} s {work} "
                    f"(QDS_ENGINE_STALL_TIMEOUT={limit:g}): it is stopped or hung"
                )
            elif load_limit:
                late = [k for k, t in self._loading_since.items() if now - t > load_limit]
                if late:
                    why = (
                        f"loading {late[0].variant_id} took longer than "
                        f"QDS_MODEL_LOAD_TIMEOUT={load_limit:g} s"
                    )
        if why is not None:
            self._on_stall(why)
        period = min(x for x in (limit, load_limit) if x) / 4
        delay = min(5.0, max(0.1, period))
        self._watch_due = time.monotonic() + delay
        self._loop_().call_later(delay, self._watch_stalls)

    def _on_stall(self, why: str) -> None:
        """A hung engine: answer everything now (retryable), then kill it; `_on_exit` restarts."""
        self._stall = f"{why}; the engine was killed"
        self._alive = False  # readiness 503 and new requests 503 from here on
        self.reason = f"{self._stall}; restarting"
        log.error("engine stall: %s", self._stall)
        self.metrics.engine_stalls.inc()
        self._publish_ready()
        self._fail_all(EngineUnavailable(self.reason, retry_after=RESTART_RETRY_AFTER_S))
        with contextlib.suppress(OSError, AttributeError):
            self._handle.kill()  # type: ignore[union-attr]

    def _spawn(self) -> None:
        self._generation += 1
        gen = self._generation
        if self.mode == "process":
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_engine, args=(self.config, child), name="qds-engine", daemon=True
            )
            proc.start()
            child.close()  # so the engine's death reads as end-of-file here
            self.pid = proc.pid
            self._handle = proc
            log.info("engine process %d started", proc.pid)
        else:
            parent, child = multiprocessing.Pipe()
            core = EngineCore(self.config, child)
            thread = threading.Thread(target=core.run, name="qds-engine", daemon=True)
            self.core = core
            self._handle = thread
            thread.start()
        self._alive = True
        self._started_at = self._last_word = time.monotonic()
        self._stall = None
        self._heard = False
        self._loading_since = {}
        self._pipe_closed = threading.Event()
        outq: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._outq = outq
        threading.Thread(
            target=self._write, args=(parent, outq), name=f"qds-engine-send-{gen}", daemon=True
        ).start()
        threading.Thread(
            target=self._read,
            args=(parent, gen, self._handle),
            name=f"qds-engine-recv-{gen}",
            daemon=True,
        ).start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let the engine finish its running batches (queued jobs get
        `shutting_down`), and wait for it to exit. Bounded: after `timeout` seconds the
        running batches are cancelled, a second later the process is killed, so the whole
        stop takes at most `timeout` + about 2 s."""
        self._stopping = True
        self.reason = "shutting down"
        self._publish_ready()
        handle = self._handle
        self._send(m.Stop())
        if isinstance(handle, threading.Thread):
            handle.join(timeout)
        elif handle is not None:
            handle.join(timeout)
            if handle.is_alive() and not self._pipe_closed.is_set():
                log.warning("the engine did not stop in %ss; cancelling its batches", timeout)
                self._send(m.Stop(cancel_running=True))
                handle.join(1)
            if handle.is_alive():
                # Its pipe closed means its work is done; only the interpreter's exit
                # (torch's and inductor's worker pools) is slow.
                level = logging.INFO if self._pipe_closed.is_set() else logging.WARNING
                log.log(level, "the engine process is still exiting; killing it")
                handle.kill()
                handle.join(1)
        if self._outq is not None:
            self._outq.put(None)

    # -- requests ----------------------------------------------------------------------------
    async def ensure_loaded(
        self, key: ModelKey, settings: QuantSettings, *, allow_load: bool
    ) -> ModelDefaults:
        """The variant's defaults once it is loaded (asking the engine to load it if needed).

        Raises LookupError when it is neither loaded nor loading and loading is not allowed,
        the load's typed `Failure` when it failed, `EngineUnavailable` when the engine died
        meanwhile.
        """
        info = self.loaded.get(key)
        if info is not None:
            return info.defaults
        if not allow_load and key not in self.loading and key not in self._load_waiters:
            raise LookupError(key)
        self._check_alive()
        waiter = self._load_waiters.get(key)
        if waiter is None:
            waiter = self._loop_().create_future()
            # A waiter that timed out leaves the result unread: that is fine.
            waiter.add_done_callback(_consume)
            self._load_waiters[key] = waiter
            self._send(m.Load(key, settings))
        # shield: one waiter timing out must not cancel the load others wait for.
        return (await asyncio.shield(waiter)).defaults

    def submit(
        self,
        key: ModelKey,
        settings: QuantSettings,
        request: GenerationRequest,
        *,
        allow_load: bool,
        on_event: Callable[[m.Progress | m.Preview], None] | None = None,
        previews: tuple[int, ...] = (),
        owner: str = "",
    ) -> PendingJob:
        """Queue a resolved request in the engine. With `on_event`, the job's progress (each
        step) and previews (after the steps in `previews`) are passed to it on the loop."""
        if self._stopping:
            raise ShuttingDown()
        self._check_alive()
        self.check_room(owner)
        job_id = str(next(self._ids))
        job = PendingJob(
            job_id, key, request.num_images, self._loop_().create_future(), on_event, owner=owner
        )
        self._jobs[job_id] = job
        self._send(
            m.Submit(
                job_id,
                key,
                settings,
                request,
                allow_load=allow_load,
                progress=on_event is not None,
                previews=previews if on_event is not None else (),
                owner=owner,
            )
        )
        self.metrics.queue_depth.set(self.depth())
        return job

    def cancel(self, job: PendingJob, reason: str) -> bool:
        """Withdraw a job (client gone, deadline, shutdown); the engine drops it at the next
        step boundary. True if it had not started (as far as this side knows)."""
        if self._jobs.pop(job.job_id, None) is not None:
            self._send(m.Cancel(job.job_id, reason))
            self.metrics.queue_depth.set(self.depth())
        if not job.future.done():
            job.future.cancel()
        return not job.started

    def abandon(self, message: str) -> int:
        """Answer every request still waiting (queued, running, or waiting for a model load)
        with ShuttingDown(message) and withdraw it from the engine (at its next step
        boundary); on the event loop. The number of jobs and load waits answered."""
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            self._send(m.Cancel(job.job_id, "shutdown"))
            if not job.future.done():
                job.future.set_exception(ShuttingDown(message))
        waiters, self._load_waiters = self._load_waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(ShuttingDown(message))
        self.metrics.queue_depth.set(0)
        return len(jobs) + len(waiters)

    async def query(self, timeout: float = 30.0) -> dict[str, Any]:
        """The engine's own accounting (scheduler counters, loads, prompt cache)."""
        self._check_alive()
        token = next(self._ids)
        fut = self._loop_().create_future()
        self._queries[token] = fut
        self._send(m.Query(token))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._queries.pop(token, None)

    # -- plumbing ----------------------------------------------------------------------------
    def _loop_(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the engine client has not been started")
        return self._loop

    def _check_alive(self) -> None:
        if not self._alive:
            raise EngineUnavailable(self.reason, retry_after=RESTART_RETRY_AFTER_S)

    def _send(self, msg: object) -> None:
        if self._outq is not None:
            self._outq.put(msg)

    @staticmethod
    def _write(conn: Connection, outq: queue.SimpleQueue[object]) -> None:
        while (msg := outq.get()) is not None:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the engine is gone; the reader reports it
                return

    def _read(self, conn: Connection, gen: int, handle: BaseProcess | threading.Thread) -> None:
        try:
            while True:
                events = conn.recv()
                self._call(self._on_events, gen, events)
        except (EOFError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            if gen == self._generation:
                self._pipe_closed.set()
        self._call(self._on_exit, gen, _describe_exit(handle))

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(fn, *args)

    def _publish_ready(self) -> None:
        self.metrics.model_ready.set(1 if self.ready else 0)

    # -- events (on the event loop) ------------------------------------------------------
    def _on_events(self, gen: int, events: list[object]) -> None:
        if gen != self._generation:
            return  # a previous engine's last words
        self._last_word = time.monotonic()
        self._heard = True
        for event in events:
            try:
                self._on_event(event)
            except Exception:  # one bad event must not lose the others
                log.exception("handling engine event %r failed", type(event).__name__)

    def _on_event(self, e: object) -> None:
        if isinstance(e, m.Metrics):
            apply(self.metrics, e.ops)
        elif isinstance(e, m.Alive):
            pass  # its arrival is the news (_last_word)
        elif isinstance(e, m.Started):
            job = self._jobs.get(e.job_id)
            if job is not None:
                job.started = True
                self.metrics.queue_depth.set(self.depth())
        elif isinstance(e, m.Finished):
            job = self._jobs.pop(e.job_id, None)
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * e.result.inference_seconds
            if job is not None and not job.future.done():
                job.future.set_result(e)
        elif isinstance(e, m.Failed):
            job = self._jobs.pop(e.job_id, None)
            if job is not None and not job.future.done():
                job.future.set_exception(e.failure)
            self.metrics.queue_depth.set(self.depth())
        elif isinstance(e, (m.Progress, m.Preview)):
            job = self._jobs.get(e.job_id)
            if job is not None and job.on_event is not None:
                job.on_event(e)
        elif isinstance(e, m.Status):
            self._engine_ready = e.ready
            self.reason = e.reason
            self.warnings = list(e.warnings)
            self.serving_mode = e.mode
            self._publish_ready()
        elif isinstance(e, m.Loading):
            self.loading.add(e.key)
            self._loading_since.setdefault(e.key, time.monotonic())
        elif isinstance(e, m.Loaded):
            self._loading_since.pop(e.key, None)
            self.loaded[e.key] = e
            self.defaults[e.key] = e.defaults
            self.loading.discard(e.key)
            waiter = self._load_waiters.pop(e.key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(e)
        elif isinstance(e, m.LoadFailed):
            self._loading_since.pop(e.key, None)
            self.loading.discard(e.key)
            waiter = self._load_waiters.pop(e.key, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(e.failure)
        elif isinstance(e, m.Evicted):
            self.loaded.pop(e.key, None)
        elif isinstance(e, m.Gpu):
            self._gpu = e.readings
        elif isinstance(e, m.Answer):
            fut = self._queries.pop(e.token, None)
            if fut is not None and not fut.done():
                fut.set_result(e.data)
        elif not isinstance(e, m.Cancelled):
            log.warning("unknown engine event %r", type(e).__name__)

    def _on_exit(self, gen: int, how: str) -> None:
        if gen != self._generation:
            return
        self._alive = False
        self._engine_ready = False
        self.loaded.clear()
        self.loading.clear()
        self._gpu = {}
        self.metrics.model_memory.clear()
        self.metrics.cache_entries.set(0)
        if self._stopping:
            self._fail_all(ShuttingDown())
            self._publish_ready()
            log.info("%s", how)
            return
        if self._stall:
            how = f"{self._stall} ({how})"
        self.reason = f"{how}; restarting"
        log.error("%s", self.reason)
        self._fail_all(EngineUnavailable(self.reason, retry_after=RESTART_RETRY_AFTER_S))
        self._publish_ready()
        self.metrics.engine_restarts.inc()
        young = time.monotonic() - self._started_at < YOUNG_DEATH_S
        delay = min(MAX_RESTART_DELAY_S, max(1.0, 2 * self._restart_delay)) if young else 0.0
        if self.restarts == 0:
            delay = 0.0
        self._restart_delay = delay
        self._loop_().call_later(delay, self._restart)

    def _restart(self) -> None:
        if self._stopping:
            return
        self.restarts += 1
        self._engine_ready = False
        self._spawn()

    def _fail_all(self, exc: Exception) -> None:
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(exc)
        waiters, self._load_waiters = self._load_waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(exc)
        queries, self._queries = self._queries, {}
        for fut in queries.values():
            if not fut.done():
                fut.set_exception(exc)
        self.metrics.queue_depth.set(0)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _describe_exit(handle: BaseProcess | threading.Thread) -> str:
    if isinstance(handle, threading.Thread):
        handle.join(5)
        return "the engine thread stopped"
    handle.join(5)
    code = handle.exitcode
    if code is None:
        return f"the engine process {handle.pid} closed its pipe"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"the engine process died (signal {-code}, {name})"
    if code == 0:
        return "the engine process exited"
    return f"the engine process died (exit code {code})"
