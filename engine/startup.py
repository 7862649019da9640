"""Start-up and compile state: where compile caches live, and compiling in the background
while the step loop serves eager (QDS_COMPILE_BACKGROUND).

How no request meets a compile (`BackgroundCompiler`):

- The denoiser's `_compiled_call_impl` (what `nn.Module.compile()` sets, and what
  `nn.Module.__call__` calls when it is set) becomes a dispatcher. Serving threads (the engine
  loop, the lanes) call the denoiser through `torch._dynamo.run`: dynamo's run-only mode, which
  runs a compiled graph when one whose guards pass is cached and the plain eager forward
  otherwise. It never traces or compiles: dynamo's eval-frame callback is per thread, and on
  these threads it is "run only".
- One background thread (`qds-compile`, niced) calls the same forward through
  `torch.compile`, which compiles on a miss. What it compiles is what the serving threads
  missed: the dispatcher copies the inputs of every forward it served eager under a signature
  it had not seen (tensor shapes and dtypes, grad / inference mode, the torch thread count,
  the LoRA slot's state: what dynamo's guards key on), and the compile thread replays them
  under the same grad mode and thread count. So the warm-up sizes (run eager before readiness,
  which takes a fraction of a second) and any size or batch size first seen later are
  compiled the same way, and requests switch to a compiled graph as soon as it exists: a
  batch of a shape no graph covers runs eager meanwhile.
- The step cache's split forward (`pipelines.step_cache`: head, tail and output as graphs of
  their own) goes through the same compiler (`wrap`), so its parts compile on the background
  thread too; with the step cache on, the whole denoiser's graphs compile on first use
  (`on_first_use`), since requests then run the parts.
- The compile thread leaves when its queue is empty and a later miss starts another (`_spawn`
  says why: an OpenMP team of a live compile thread slows every serving forward).
- Which path served is counted where it happens: the compiled graphs run through a wrapper
  of inductor's compile function that counts calls on the calling thread, so a forward that
  ran no compiled graph is an eager one. A compile started on a serving thread would be
  counted in `serving_compiles` (the tests assert it stays 0).

Limits: the compile thread cannot change shared model state, so a forward with a LoRA adapter
enabled compiles only when the compile thread finds the slot in that state (best effort;
eager otherwise, correct either way: dynamo's guards check the state). `QDS_COMPILE_SCOPE=blocks`
compiles in the foreground (regional compilation calls each block separately).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pipelines.loader import LoadedPipeline

log = logging.getLogger("qdserve.compile")

Mode = Literal["eager", "compiling", "compiled"]
MODES: tuple[Mode, ...] = ("eager", "compiling", "compiled")
# The compile thread's nice increment: the step loop keeps the cores while it compiles.
COMPILE_NICE = 10
# A job whose LoRA state differs from the slot's now waits this long before another look.
STATE_RETRY_S = 1.0
STATE_RETRIES = 30

_tls = threading.local()
_live: weakref.WeakSet[BackgroundCompiler] = weakref.WeakSet()


# -- compile caches ------------------------------------------------------------------------
def configure_compile_cache(cache_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    """Put inductor's (and Triton's) on-disk caches under `cache_dir` (QDS_CACHE_DIR: the
    persistent volume in the container) unless the operator set them. Returns what was set.

    Called before the first compile in the process (environment variables are read when a
    cache is first used)."""
    if not cache_dir:
        return {}
    root = Path(cache_dir)
    default = _inductor_default()  # first: importing inductor may rewrite the variables
    chosen: dict[str, str] = {}
    caches = (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))
    for variable, folder in caches:
        value = os.environ.get(variable)
        # torch writes its default into TORCHINDUCTOR_CACHE_DIR the first time anything asks
        # for the cache (here: in the HTTP process, whose environment the engine inherits);
        # that default is not the operator's choice.
        if not value or (default and value.startswith(default)):
            os.environ[variable] = str(root / folder)
            chosen[variable] = os.environ[variable]
    return chosen


def configure_kernel_threads(shared: bool) -> None:
    """QDS_COMPILE_SHARED_THREADS: inductor's CPU kernels read their thread count when they
    run instead of baking in the compiling thread's, so one graph serves the engine's threads
    and a lane's single thread (its FX cache key then leaves the thread count out: the second
    thread count is a cache hit, not a compile). Set before the first compile in the process,
    and the same in `qdserve warmup` (the key differs with it).

    Off leaves torch's own value alone: its default, or TORCHINDUCTOR_CPP_DYNAMIC_THREADS where
    an operator set it (that variable is the very default `process_default` writes)."""
    if not shared:
        return
    import torch._inductor.config as inductor

    from engine.compiling import process_default

    process_default(inductor, "cpp.dynamic_threads", True)
    log.info("compiled CPU kernels read their thread count at run time (shared threads)")


def _inductor_default() -> str | None:
    """Inductor's own default cache folder (/tmp/torchinductor_<user>)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except Exception:
        return None


# -- which path served -----------------------------------------------------------------------
def _hits() -> int:
    return getattr(_tls, "hits", 0)


def _counting_inductor(gm: Any, example_inputs: Any) -> Callable[..., Any]:
    """Inductor (`torch.compile`'s default backend), with each call of the compiled graph
    counted on the calling thread; compiles on a thread that is not the compile thread are
    counted too (they must not happen)."""
    from torch._inductor.compile_fx import compile_fx

    if not getattr(_tls, "compiling", False):
        BackgroundCompiler.serving_compiles += 1
        log.warning("a graph compiled on a serving thread (%s)", threading.current_thread().name)
    compiled = compile_fx(gm, example_inputs)

    def run(*args: Any) -> Any:
        _tls.hits = _hits() + 1
        return compiled(*args)

    return run


# -- signatures and copies -------------------------------------------------------------------
def _describe(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        # The strides too: dynamo guards on them (the step cache passes views, e.g. rows of a
        # batch's embedding), so a layout not compiled yet is a miss of its own.
        return (
            "T",
            tuple(value.shape),
            tuple(value.stride()),
            str(value.dtype),
            str(value.device),
            value.requires_grad,
        )
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, _describe(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    """Tensors copied with their layout (the same sizes, strides and storage offset: a plain
    clone would make a view contiguous, and the graph compiled for it would then never match
    the view the serving thread passes); aliasing kept (one copy per source tensor),
    containers rebuilt."""
    import torch

    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            source = value.detach()
            copy = torch.empty((0,), dtype=source.dtype, device=source.device)
            copy.set_(
                source.untyped_storage().clone(),
                source.storage_offset(),
                source.size(),
                source.stride(),
            )
            memo[id(value)] = copy
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_copy(v, memo) for v in value)
    if isinstance(value, list):
        return [_copy(v, memo) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v, memo) for k, v in value.items()}
    return value


class _Target:
    """One function served through a background compiler: the denoiser's forward, or a step
    cache part (`BackgroundCompiler.wrap`). Compiled on the compile thread, run-only on the
    serving threads (module docstring)."""

    def __init__(self, owner: BackgroundCompiler, name: str, fn: Callable[..., Any]) -> None:
        import torch

        self.owner = owner
        self.name = name
        # Forwards are counted once each: the whole denoiser's, or a split forward's head.
        self.counted = name in ("model", "head")
        self.compiled = torch.compile(fn, backend=_counting_inductor)
        self.run_only = torch._dynamo.run(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._dispatch(self, args, kwargs)


class _Job:
    def __init__(
        self, target: _Target, signature: Any, args: tuple, kwargs: dict, state: Any
    ) -> None:
        import torch

        self.target = target
        self.signature = signature
        self.inference = torch.is_inference_mode_enabled()
        self.grad = torch.is_grad_enabled()
        self.threads = torch.get_num_threads()
        self.state = state
        self.tries = 0
        memo: dict[int, Any] = {}
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
            self.args = _copy(args, memo)
            self.kwargs = _copy(kwargs, memo)


class BackgroundCompiler:
    """The denoiser of one loaded pipeline served eager while its graphs compile on a
    background thread (module docstring)."""

    serving_compiles = 0  # process-wide: compiles that happened on a serving thread

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        state: Callable[[], Any] = lambda: None,
        on_change: Callable[[BackgroundCompiler], None] | None = None,
        nice: int = COMPILE_NICE,
        on_first_use: frozenset[str] = frozenset(),
    ) -> None:
        import torch

        from engine.compiling import RECOMPILE_LIMIT, denoiser_of, process_default

        self.loaded = loaded
        self.module = denoiser_of(loaded)
        # Targets whose warm-up forwards are not compiled up front: the first serving miss
        # queues them (eager until then). The engine names the whole denoiser when the step
        # cache is on, since requests then run the split forward's parts unless they opt out.
        self.on_first_use = on_first_use
        self.state = state
        self.on_change = on_change
        self.nice = nice
        config = torch._dynamo.config
        process_default(config, "recompile_limit", max(config.recompile_limit, RECOMPILE_LIMIT))
        self._model = _Target(self, "model", self.module._call_impl)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[_Job] = collections.deque()
        self._seen: set[Any] = set()
        self._required: set[Any] = set()  # the warm-up's signatures: "compiled" once all done
        self._done: set[Any] = set()
        self._skipped: set[Any] = set()  # LoRA-state jobs the slot never matched
        self._thread: threading.Thread | None = None  # the compile thread while it has work
        self._started = False
        self._stopped = False
        self.mode: Mode = "eager"
        self.error: str | None = None
        self.compile_seconds: list[tuple[str, float]] = []
        self.started_at = 0.0
        self.compiled_at: float | None = None
        self.forwards = {"compiled": 0, "eager": 0}
        self.cache_hits = 0
        self.cache_misses = 0
        self.module._compiled_call_impl = self
        _live.add(self)

    # -- serving threads -------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._dispatch(self._model, args, kwargs)

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """`fn` served like the denoiser: compiled on this compiler's thread, run-only on the
        serving threads (the step cache's split-forward parts, `pipelines.step_cache`)."""
        return _Target(self, name, fn)

    def _dispatch(self, target: _Target, args: tuple, kwargs: dict) -> Any:
        if getattr(_tls, "compiling", False):
            return target.compiled(*args, **kwargs)
        before = _hits()
        out = target.run_only(*args, **kwargs)
        hit = _hits() > before
        if target.counted:
            self.forwards["compiled" if hit else "eager"] += 1
        if not hit:
            self._missed(target, args, kwargs)
        return out

    def _missed(self, target: _Target, args: tuple, kwargs: dict) -> None:
        import torch

        state = self.state()
        signature = (
            target.name,
            _describe(args),
            _describe(kwargs),
            torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(),
            torch.get_num_threads(),
            state,
        )
        with self._lock:
            if signature in self._seen or self._stopped:
                return
            if not self._started and target.name in self.on_first_use:
                return  # not seen yet: the first serving miss queues it
            self._seen.add(signature)
            if not self._started:
                self._required.add(signature)  # before start(): the warm-up's forwards
        job = _Job(target, signature, args, kwargs, state)
        with self._lock:
            self._queue.append(job)
            if self._started and self._thread is None and not self._stopped:
                self._spawn()  # the last compile thread left when its queue ran dry

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start compiling what the warm-up (run before this, eager) and later requests met."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self.started_at = time.monotonic()
            self._set_mode("compiling" if self._queue else "compiled")
            if self._queue:
                self._spawn()

    def _spawn(self) -> None:
        """Under self._lock: a compile thread for what is queued.

        The thread leaves as soon as the queue is empty, and a later miss starts a new one,
        because a thread that ran a compiled graph owns an OpenMP team of its own: while any
        such team exists, libgomp counts more threads than CPUs and cuts every worker's
        spin-wait to almost nothing, so the serving thread's workers sleep between parallel
        regions and each region pays a wake-up (measured: +40 ms a lone request on the demo
        model, 0.71x img/s at concurrency 1). A thread's team is freed when it exits."""
        self._thread = threading.Thread(target=self._work, name="qds-compile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._queue.clear()
            self._wake.notify()

    def alive(self) -> bool:
        """A compile thread is still running (mid-compile after a stop)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every signature seen so far is compiled (tests, `qdserve warmup`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left if left is not None else 1.0)
        return True

    _busy = False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._queue) + (1 if self._busy else 0)
        return {
            "mode": self.mode,
            "pending": pending,
            "compiled": len(self._done),
            "forwards": dict(self.forwards),
            "serving_compiles": BackgroundCompiler.serving_compiles,
            "compile_seconds": list(self.compile_seconds),
            "inductor_cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            "seconds_to_compiled": (
                None if self.compiled_at is None else self.compiled_at - self.started_at
            ),
            "error": self.error,
        }

    def _set_mode(self, mode: Mode) -> None:
        """Under self._lock."""
        if mode == self.mode:
            return
        self.mode = mode
        if mode == "compiled" and self.compiled_at is None:
            self.compiled_at = time.monotonic()
        if self.on_change is not None:
            self.on_change(self)

    # -- the compile thread ----------------------------------------------------------------
    def _work(self) -> None:
        import torch

        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        default_threads = torch.get_num_threads()
        _tls.compiling = True
        while True:
            with self._lock:
                if self._stopped or not self._queue:
                    self._busy = False
                    if self._thread is threading.current_thread():
                        self._thread = None  # the next miss starts a new thread (_spawn)
                    self._wake.notify_all()
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                outcome = self._compile(job, default_threads)
            except Exception as exc:  # a failed compile leaves the rest eager
                outcome = "failed"
                message = f"compiling in the background failed, serving eager ({exc!r})"[:300]
                log.warning(message)
                with self._lock:
                    self.error = message
                    self._queue.clear()
                    self._stopped = True
            with self._lock:
                if outcome == "retry":
                    self._queue.append(job)
                elif outcome == "done":
                    self._done.add(job.signature)
                elif outcome == "skipped":
                    self._skipped.add(job.signature)
                self._busy = False
                if self.error is not None:
                    self._set_mode("eager")
                elif self._required <= self._done | self._skipped:
                    self._set_mode("compiled")
                self._wake.notify_all()
                if self._stopped:
                    return
            if outcome == "retry":
                time.sleep(STATE_RETRY_S)

    def _compile(self, job: _Job, default_threads: int) -> str:
        import torch

        if job.state != self.state():
            job.tries += 1
            return "retry" if job.tries < STATE_RETRIES else "skipped"
        from torch._dynamo.utils import counters

        hits, misses = _cache_counts(counters)
        start = time.perf_counter()
        torch.set_num_threads(job.threads)
        try:
            with torch.inference_mode(job.inference), torch.set_grad_enabled(job.grad):
                # Twice: the second call must find the graph the first one compiled.
                for _ in range(2):
                    job.target.compiled(*job.args, **job.kwargs)
        finally:
            # Puts this thread's count back, and with it the default new threads adopt.
            torch.set_num_threads(default_threads)
        seconds = time.perf_counter() - start
        label = _label(job)
        hits_after, misses_after = _cache_counts(counters)
        self.cache_hits += hits_after - hits
        self.cache_misses += misses_after - misses
        self.compile_seconds.append((label, round(seconds, 2)))
        log.info(
            "compiled %s in %.1fs (background; inductor cache: %d hit(s), %d miss(es))",
            label,
            seconds,
            hits_after - hits,
            misses_after - misses,
        )
        return "done"


def _cache_counts(counters: Any) -> tuple[int, int]:
    """Inductor's FX graph cache hits and misses so far in this process (a miss compiles
    kernels; a hit loads them from TORCHINDUCTOR_CACHE_DIR)."""
    inductor = counters["inductor"]
    return int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"])


def _label(job: _Job) -> str:
    """A short name for a job: the part (when not the whole denoiser), the first tensor
    argument's shape and the threads."""
    part = "" if job.target.name == "model" else f"{job.target.name} "
    for value in (*job.args, *job.kwargs.values()):
        shape = getattr(value, "shape", None)
        if shape is not None:
            return f"{part}{'x'.join(map(str, shape))} on {job.threads} thread(s)"
    return f"{part}on {job.threads} thread(s)"


def stop_all(timeout: float) -> bool:
    """Stop every background compiler in this process and wait up to `timeout` seconds for
    their threads; False when one is still mid-compile (a compile cannot be interrupted, and
    an interpreter that exits under it aborts: "terminate called without an active
    exception"), so the engine process then leaves with os._exit."""
    compilers = list(_live)
    for compiler in compilers:
        compiler.stop()
    deadline = time.monotonic() + timeout
    for compiler in compilers:
        thread = compiler._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(c.alive() for c in compilers)


def compiler_of(loaded: LoadedPipeline) -> BackgroundCompiler | None:
    """The background compiler serving this pipeline's denoiser, if any."""
    from engine.compiling import denoiser_of

    try:
        module = denoiser_of(loaded)
    except Exception:
        return None
    impl = getattr(module, "_compiled_call_impl", None)
    return impl if isinstance(impl, BackgroundCompiler) else None


# -- `qdserve warmup` ------------------------------------------------------------------------
def warm_caches(
    quant: Any,
    settings: Any,
    *,
    lanes: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Fill the compile caches for the configured model ahead of a start (a Kubernetes init
    container or Job on the pods' volume): load it as the engine does, compile every graph the
    engine's warm-up runs (the warm-up sizes at 1 and 2 images, on the engine's and a lane's
    thread count, and the LoRA slot enabled when adapters are declared), write inductor's
    cache, return what was done. Raises when compiling fails."""
    import torch

    from engine.compiling import compile_decision, compile_scope, default_warmup, warmup_sizes
    from pipelines import lora
    from pipelines.loader import load_pipeline

    started = time.monotonic()
    chosen = configure_compile_cache(getattr(quant, "cache_dir", None))
    configure_kernel_threads(settings.compile_shared_threads)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_pipeline(quant)
    report: dict[str, Any] = {
        "model": loaded.model,
        "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "(inductor's default)",
        "cache_set_from_QDS_CACHE_DIR": bool(chosen),
        "load_seconds": round(time.monotonic() - started, 1),
    }
    try:
        lora.attach(loaded, lora.parse_loras(settings.loras), required=True)
        decided, why = compile_decision(settings.compile, loaded)
        if not decided:
            report.update(compiled=False, why=why)
            return report
        scope = compile_scope(settings.compile_scope, loaded)
        sizes = warmup_sizes(settings.warmup_sizes, loaded)
        compile_start = time.monotonic()
        if scope == "model":
            adapters = lora.adapters_of(loaded)
            compiler = BackgroundCompiler(loaded, state=lambda: lora.slot_active(loaded), nice=0)
            default_warmup(loaded, sizes, lanes)
            compiler.start()
            if not compiler.join(timeout):
                raise TimeoutError(f"compiling took longer than {timeout} s")
            if adapters is not None and adapters.adapters:
                first = next(iter(adapters.adapters))
                default_warmup(loaded, sizes, lanes, ((first, 1.0),))
                lora.activate(loaded, ((first, 1.0),))
                try:
                    if not compiler.join(timeout):
                        raise TimeoutError(f"compiling took longer than {timeout} s")
                finally:
                    lora.activate(loaded, ())
            stats = compiler.stats()
            compiler.stop()
            if stats["error"]:
                raise RuntimeError(stats["error"])
            report["graphs"] = stats["compile_seconds"]
        else:
            from engine.compiling import compile_denoiser

            compile_denoiser(loaded, scope)
            default_warmup(loaded, sizes, lanes)
        report.update(
            compiled=True,
            why=why,
            scope=scope,
            sizes=[f"{w}x{h}" for w, h in sizes],
            compile_seconds=round(time.monotonic() - compile_start, 1),
        )
        return report
    finally:
        loaded.release()
