"""The engine core: its scheduler and fault handling against a fake pipeline (in-process, fast),
and the real engine process behind a real server (the embedded model).

Unit tests drive `EngineCore` directly through a pipe, exactly as the HTTP process does, with
a fake loader and fake step batches; a gate in the scheduler's `before_batch` hook holds the
loop inside a step, so step boundaries are reached deterministically. Assertions read the
engine's own accounting (step compositions, cancel and drop counters), never timings.

Integration tests start `qdserve`'s app with `engine="process"`: the engine is a spawned
process, killed with SIGKILL mid-batch, left by a disconnecting client, and stopped by SIGTERM.
Their hooks are module-level functions so they reach the engine process by pickle.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch
from PIL import Image
from test_service_support import Server, free_port, running_server

from engine import messages as m
from engine.batches import WholeCallBatch
from engine.core import EngineConfig, EngineCore, EngineHooks
from engine.failures import EngineError, ModelLoadFailed, OutOfMemory, ShuttingDown
from engine.keys import key_for
from engine.telemetry import MetricsRecorder, apply
from pipelines.generate import GenerationRequest, GenerationResult
from pipelines.loader import ModelDefaults
from pipelines.seeds import image_seeds
from quantization.backends import ModelLoadError
from quantization.settings import QuantSettings
from service.metrics import Metrics
from service.settings import ServiceSettings

IMG = "/v1/images/generations"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.01)
    return value


# -- a fake pipeline -------------------------------------------------------------------------
DEFAULTS = ModelDefaults(size=16, steps=3, guidance=3.5, size_multiple=16)


@dataclass
class FakeLoaded:
    model: str = "fake"
    backend: str = "none"
    quant_type: str | None = None
    defaults: ModelDefaults = DEFAULTS
    components: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    storage_bytes: int = 1000
    pipeline: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    released: bool = False

    def release(self) -> None:
        self.released = True


def kind_of(_loaded: Any, req: GenerationRequest) -> tuple[Any, ...]:
    return (req.width, req.height, req.guidance_scale, req.negative_prompt is not None)


class FakeBatch:
    """Steps every member by one per `step()`; finishes a member after its own steps.

    Prompts steer faults: "oom" raises torch.OutOfMemoryError from the step after allocating
    a large tensor held in a reference cycle (only a collection frees it), "boom" raises a
    RuntimeError; `FakeBatch.tensors` keeps weak references to what "oom" allocated.
    """

    tensors: ClassVar[list[weakref.ref]] = []
    OOM_BYTES = 256 * 2**20

    def __init__(self, loaded: Any, *, max_images: int, **_kw: Any) -> None:
        self.loaded = loaded
        self.max_images = max_images
        self.members: dict[str, list[Any]] = {}  # job id -> [request, steps done]
        self._key: tuple[Any, ...] | None = None

    @property
    def key(self) -> tuple[Any, ...] | None:
        return self._key

    def __len__(self) -> int:
        return sum(r.num_images for r, _ in self.members.values())

    def job_ids(self) -> list[str]:
        return list(self.members)

    def can_join(self, req: GenerationRequest) -> bool:
        if not self.members:
            return True
        return kind_of(None, req) == self._key and len(self) + req.num_images <= self.max_images

    def add(self, job_id: str, req: GenerationRequest) -> None:
        if not self.members:
            self._key = kind_of(None, req)
        self.members[job_id] = [req, 0]

    def remove(self, job_id: str) -> bool:
        return self.members.pop(job_id, None) is not None

    def progress(self, job_id: str) -> tuple[int, int]:
        req, done = self.members[job_id]
        return done, req.num_inference_steps

    def latents_preview(self, job_id: str) -> list[Image.Image]:
        req, done = self.members[job_id]
        return [Image.new("RGB", (req.width, req.height), (done, 0, 0))] * req.num_images

    def step(self) -> list[tuple[str, GenerationResult]]:
        prompts = {r.prompt for r, _ in self.members.values()}
        if "oom" in prompts:
            big = torch.ones(self.OOM_BYTES // 4)  # committed pages, not just reserved
            holder: dict[str, Any] = {"tensor": big}
            holder["self"] = holder  # a cycle: reference counting alone never frees it
            FakeBatch.tensors.append(weakref.ref(big))
            del big
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "boom" in prompts:
            raise RuntimeError("secret detail of a failed step")
        done = []
        for job_id, member in list(self.members.items()):
            member[1] += 1
            req = member[0]
            if member[1] >= req.num_inference_steps:
                del self.members[job_id]
                images = [Image.new("RGB", (req.width, req.height))] * req.num_images
                done.append(
                    (
                        job_id,
                        GenerationResult(
                            images,
                            image_seeds(req.seed, req.num_images),
                            req.width,
                            req.height,
                            req.num_inference_steps,
                            0.0,
                        ),
                    )
                )
        return done


class Gate:
    """Holds the engine inside chosen steps (the scheduler's before_batch hook): at each step
    number in `at_steps`, `arrivals[n]` is set and the step waits for `releases[n]`. `arrived` /
    `release` are the first hold's events."""

    def __init__(self, *at_steps: int) -> None:
        self.calls = 0
        self.arrivals = {n: threading.Event() for n in at_steps or (1,)}
        self.releases = {n: threading.Event() for n in self.arrivals}
        first = min(self.arrivals)
        self.arrived, self.release = self.arrivals[first], self.releases[first]

    def __call__(self, _jobs: list) -> None:
        self.calls += 1
        if self.calls in self.arrivals:
            self.arrivals[self.calls].set()
            assert self.releases[self.calls].wait(30)


class Harness:
    """An EngineCore on a thread, driven through a pipe as the HTTP process drives it."""

    def __init__(self, hooks: EngineHooks, cache_dir: Path, **settings: Any) -> None:
        settings.setdefault("max_batch", 4)
        self.quant = QuantSettings(cache_dir=cache_dir)
        self.conn, child = multiprocessing.Pipe()
        config = EngineConfig(
            self.quant,
            ServiceSettings(engine="inline", **{"compile": False, **settings}),
            {},
            hooks,
        )
        self.core = EngineCore(config, child)
        self.thread = threading.Thread(target=self.core.run, daemon=True)
        self.thread.start()
        self.events: list[object] = []
        self.key = key_for(self.quant)
        self.wait(lambda e: isinstance(e, m.Status) and e.ready)

    @property
    def scheduler(self) -> Any:
        return self.core.scheduler

    def submit(self, job_id: str, prompt: str = "x", **req: Any) -> None:
        req = {"width": 16, "height": 16, "num_inference_steps": 3, "seed": 1, **req}
        req.setdefault("guidance_scale", 3.5)
        gen = GenerationRequest(prompt, **req)
        self.conn.send(m.Submit(job_id, self.key, self.quant, gen))

    def wait(self, pred: Callable[[object], bool], timeout: float = 30) -> Any:
        """The first event (received now or earlier) matching `pred`."""
        for event in self.events:
            if pred(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.05):
                batch = self.conn.recv()
                self.events.extend(batch)
                for event in batch:
                    if pred(event):
                        return event
        raise TimeoutError("no such event")

    def finished(self, job_id: str) -> m.Finished:
        return self.wait(lambda e: isinstance(e, m.Finished) and e.job_id == job_id)

    def failed(self, job_id: str) -> m.Failed:
        return self.wait(lambda e: isinstance(e, m.Failed) and e.job_id == job_id)

    def steps(self) -> list[list[str]]:
        """The job ids of each step run so far."""
        return [sorted(j for _, j, _ in step) for step in self.scheduler.step_log]

    def close(self) -> None:
        self.conn.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def engine(cache_dir: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        hooks = EngineHooks(
            load=kw.pop("load", lambda _s: FakeLoaded()),
            make_batch=FakeBatch,
            kind_of=kind_of,
            before_batch=kw.pop("gate", None),
        )
        harness = Harness(hooks, cache_dir, **kw)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


# -- scheduling ------------------------------------------------------------------------------
def test_lone_request_starts_at_once_and_finishes(engine) -> None:
    h = engine()
    h.submit("a", num_inference_steps=3)
    started = h.wait(lambda e: isinstance(e, m.Started))
    done = h.finished("a")
    assert started.job_id == "a"
    assert done.batch_images == 1 and done.result.seeds == [1]
    assert h.steps() == [["a"]] * 3


def test_request_joins_at_the_next_step_and_leaves_after_its_own_steps(engine) -> None:
    gate = Gate(2)
    h = engine(gate=gate)
    h.submit("a", num_inference_steps=5)
    assert gate.arrived.wait(10)  # the engine is inside a's second step
    h.submit("b", num_inference_steps=4, seed=2)
    gate.release.set()
    h.finished("a")
    h.finished("b")
    # a alone for two steps; b joins at the boundary after step 2 (not after a's last step),
    # shares three steps, and runs its last step alone.
    assert h.steps() == [["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "b"], ["b"]]
    assert h.wait(lambda e: isinstance(e, m.Started) and e.job_id == "b")


def test_only_compatible_requests_share_steps_and_max_batch_holds(engine) -> None:
    gate = Gate(1)
    h = engine(gate=gate, max_batch=4)
    h.submit("a", num_images=2)
    assert gate.arrived.wait(10)
    h.submit("b", num_images=2)  # fits: 4 images
    h.submit("c", num_images=2)  # same kind, no room: waits for a sample to leave
    h.submit("d", width=32, height=32)  # another size: its own batch, in turn
    h.submit("e", guidance_scale=1.0)  # another guidance: its own batch
    gate.release.set()
    for job in "abcde":
        h.finished(job)
    images = {"a": 2, "b": 2, "c": 2, "d": 1, "e": 1}
    for step in h.steps():
        kinds = {"d" if j == "d" else "e" if j == "e" else "abc" for j in step}
        assert len(kinds) == 1, step  # never two kinds in one forward
        assert sum(images[j] for j in step) <= 4, step
    assert ["a", "b"] in h.steps()
    assert not any({"a", "c"} <= set(s) for s in h.steps())  # c waited for a to leave
    assert ["b", "c"] in h.steps()


def test_client_gone_removes_its_samples_from_the_running_batch(engine) -> None:
    gate = Gate(1, 3)
    h = engine(gate=gate)
    h.submit("a", num_inference_steps=6)
    assert gate.arrivals[1].wait(10)
    h.submit("b", num_inference_steps=6, seed=2)
    gate.releases[1].set()
    assert gate.arrivals[3].wait(10)  # a and b share step 3
    h.conn.send(m.Cancel("b", "client_gone"))
    gate.releases[3].set()
    cancelled = h.wait(lambda e: isinstance(e, m.Cancelled))
    h.finished("a")
    assert (cancelled.job_id, cancelled.where, cancelled.images) == ("b", "running", 1)
    # Dropped at the next boundary: b is in steps 2-3 only, a runs its remaining steps alone.
    assert h.steps() == [["a"], ["a", "b"], ["a", "b"], ["a"], ["a"], ["a"]]
    stats = h.scheduler.stats()
    assert stats["cancelled"] == {"client_gone": 1}
    assert stats["dropped_images"] == {"client_gone": 1}
    assert not any(isinstance(e, m.Finished) and e.job_id == "b" for e in h.events)
    ops = [e for e in h.events if isinstance(e, m.Metrics)]
    assert ("cancelled", ("client_gone",), "inc", 1.0) in [op for e in ops for op in e.ops]


def test_cancel_while_queued_costs_no_compute(engine) -> None:
    gate = Gate(1)
    h = engine(gate=gate, max_batch=1)
    h.submit("a")
    assert gate.arrived.wait(10)
    h.submit("b")  # max_batch 1: queued behind a
    h.conn.send(m.Cancel("b", "timeout"))
    gate.release.set()
    h.finished("a")
    cancelled = h.wait(lambda e: isinstance(e, m.Cancelled))
    assert (cancelled.job_id, cancelled.where) == ("b", "queued")
    assert all(step == ["a"] for step in h.steps())
    assert h.scheduler.stats()["cancelled"] == {"timeout": 1}
    assert h.scheduler.started_jobs == 1


def test_progress_and_previews_of_a_streamed_job(engine) -> None:
    h = engine()
    gen = GenerationRequest("x", width=16, height=16, num_inference_steps=4, seed=1)
    h.conn.send(m.Submit("a", h.key, h.quant, gen, progress=True, previews=(1, 3)))
    h.finished("a")
    progress = [(e.step, e.total) for e in h.events if isinstance(e, m.Progress)]
    previews = [
        (e.index, e.step, e.images[0].getpixel((0, 0)))
        for e in h.events
        if isinstance(e, m.Preview)
    ]
    # Every step boundary while it runs (the last one is its result), and a preview of the
    # latents after steps 1 and 3.
    assert progress == [(1, 4), (2, 4), (3, 4)]
    assert previews == [(0, 1, (1, 0, 0)), (1, 3, (3, 0, 0))]
    h.submit("quiet")
    h.finished("quiet")
    assert not any(isinstance(e, (m.Progress, m.Preview)) and e.job_id == "quiet" for e in h.events)


# -- faults ----------------------------------------------------------------------------------
def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_out_of_memory_frees_the_failed_steps_memory(engine) -> None:
    """The defect: gc.collect() / empty_cache() ran inside the `except` block, where the
    traceback still holds the failed call's frames and tensors. The fake step allocates
    256 MB held in a reference cycle and raises OutOfMemoryError; with automatic collection
    off, only a collection after the handler frees it. The engine answers after freeing, so
    when the failure arrives the tensor must be gone and RSS back."""
    h = engine()
    h.submit("warm")
    h.finished("warm")
    FakeBatch.tensors.clear()
    gc.collect()
    gc.disable()
    try:
        before = _rss()
        h.submit("x", prompt="oom")
        failed = h.failed("x")
        after = _rss()
        alive = [ref() is not None for ref in FakeBatch.tensors]
    finally:
        gc.enable()
    assert isinstance(failed.failure, OutOfMemory)
    # torch's allocator line is the log's (`detail`), not the client's (`message`).
    assert "Tried to allocate 20.00 GiB" in failed.failure.detail
    assert "GiB" not in failed.failure.message
    assert alive == [False]
    assert after - before < FakeBatch.OOM_BYTES / 4, (before, after)
    assert h.scheduler.ooms == 1
    h.submit("next")
    assert h.finished("next").batch_images == 1  # and the engine keeps serving


def test_failed_step_fails_only_its_batch(engine) -> None:
    gate = Gate(1)
    h = engine(gate=gate)
    h.submit("a", prompt="boom")
    assert gate.arrived.wait(10)
    h.submit("other", width=32, height=32)  # another kind, another batch
    gate.release.set()
    failed = h.failed("a")
    assert isinstance(failed.failure, EngineError) and "secret detail" in str(failed.failure)
    assert h.finished("other").result.width == 32


def test_stop_answers_queued_and_finishes_running(engine) -> None:
    gate = Gate(1)
    h = engine(gate=gate, max_batch=1)
    h.submit("running", num_inference_steps=2)
    assert gate.arrived.wait(10)
    h.submit("queued")
    h.conn.send(m.Stop())
    gate.release.set()
    assert isinstance(h.failed("queued").failure, ShuttingDown)
    assert h.finished("running").result.steps == 2
    h.thread.join(10)
    assert not h.thread.is_alive()  # the loop exits once the running batch is done


def test_loads_are_single_flight_and_failures_are_backed_off(engine) -> None:
    loads: list[str] = []
    release = threading.Event()

    def load(settings: QuantSettings) -> FakeLoaded:
        loads.append(settings.quant_backend)
        if settings.quant_backend == "quanto":
            assert release.wait(10)
            if loads.count("quanto") == 1:
                raise ModelLoadError("injected: weights file truncated")
        return FakeLoaded(backend=settings.quant_backend)

    h = engine(load=load)
    variant = h.quant.with_backend("quanto", "int8")
    key = key_for(variant)
    gen = GenerationRequest("x", width=16, height=16, num_inference_steps=1, seed=1)
    for job in ("a", "b"):
        h.conn.send(m.Submit(job, key, variant, gen))
    h.wait(lambda e: isinstance(e, m.Loading) and e.key == key)
    release.set()
    a, b = h.failed("a").failure, h.failed("b").failure
    assert isinstance(a, ModelLoadFailed) and isinstance(b, ModelLoadFailed)
    assert "truncated" in a.detail and "truncated" not in a.message  # the cause is the log's
    assert loads.count("quanto") == 1  # one load for both waiters
    # Remembered for the back-off: answered at once, no second attempt.
    h.conn.send(m.Submit("c", key, variant, gen))
    assert isinstance(h.failed("c").failure, ModelLoadFailed)
    assert loads.count("quanto") == 1
    h.core.cache._failed.clear()  # the back-off has passed: not cached as a failure
    h.conn.send(m.Submit("d", key, variant, gen))
    h.finished("d")
    assert loads.count("quanto") == 2


def test_ready_after_default_and_preloads_with_a_warning_per_failed_preload(
    cache_dir: Path,
) -> None:
    def load(settings: QuantSettings) -> FakeLoaded:
        if settings.quant_backend == "torchao":
            raise ModelLoadError("injected: no kernels")
        return FakeLoaded(backend=settings.quant_backend)

    quant = QuantSettings(cache_dir=cache_dir)
    preload = {
        key_for(v): v
        for v in (quant.with_backend("quanto", "int8"), quant.with_backend("torchao", "int8wo"))
    }
    conn, child = multiprocessing.Pipe()
    hooks = EngineHooks(load=load, make_batch=FakeBatch, kind_of=kind_of)
    settings = ServiceSettings(engine="inline", cache_max_entries=3, compile=False)
    config = EngineConfig(quant, settings, preload)
    config.hooks = hooks
    core = EngineCore(config, child)
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    try:
        statuses: list[m.Status] = []
        loaded: list[str] = []
        while not (statuses and statuses[-1].ready):
            assert conn.poll(20)
            for e in conn.recv():
                if isinstance(e, m.Status):
                    statuses.append(e)
                elif isinstance(e, m.Loaded):
                    loaded.append(e.key.backend)
        assert statuses[0].reason.startswith("loading ") and not statuses[0].ready
        assert sorted(loaded) == ["none", "quanto"]
        (warning,) = statuses[-1].warnings
        # The cause goes to the log; /readyz (unauthenticated) names the variant only.
        assert "preloading " in warning and "torchao:int8wo failed" in warning
        assert "injected" not in warning
    finally:
        conn.close()
        thread.join(10)


def test_engine_metric_operations_replay_on_the_http_registry() -> None:
    recorder = MetricsRecorder()
    recorder.cancelled.labels("timeout").inc()
    recorder.images.labels("quanto").inc(3)
    recorder.step_duration.labels("m", "quanto", "int8").observe(0.02)
    recorder.model_memory.labels("m", "quanto", "int8", "vae").set(10)
    recorder.model_memory.remove("m", "quanto", "int8", "vae")
    recorder.model_memory.remove("m", "quanto", "int8", "never-set")  # tolerated
    metrics = Metrics()
    apply(metrics, recorder.drain())
    text = metrics.render().decode()
    assert 'qds_cancelled_total{reason="timeout"} 1.0' in text
    assert 'qds_images_generated_total{backend="quanto"} 3.0' in text
    assert 'qds_step_duration_seconds_count{backend="quanto",model="m",quant_type="int8"} 1.0' in (
        text
    )
    assert "qds_model_memory_bytes{" not in text
    assert recorder.drain() == []


# -- the whole-call fallback -----------------------------------------------------------------
class _Output:
    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images


class FakePipeline:
    """Enough of a diffusers pipeline for generate_batch: steps, the step-end callback."""

    def __init__(self) -> None:
        self.steps_run = 0

    def __call__(
        self,
        prompt: list[str],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: list[torch.Generator],
        output_type: str = "pil",
        callback_on_step_end: Any = None,
    ) -> _Output:
        for i in range(num_inference_steps):
            self.steps_run += 1
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, None, {})
        return _Output([Image.new("RGB", (width, height)) for _ in prompt])


def test_whole_call_batch_stops_when_every_request_is_gone() -> None:
    loaded = FakeLoaded(pipeline=FakePipeline())
    req = GenerationRequest(
        "x", width=16, height=16, num_inference_steps=10, seed=1, guidance_scale=3.5
    )
    removed: list[str] = []
    batch = WholeCallBatch(loaded, max_images=4)

    def between() -> None:  # the engine reads its pipe here; the clients left at step 3
        if loaded.pipeline.steps_run == 3 and not removed:
            removed.extend(batch.job_ids())
            for job_id in removed:
                batch.remove(job_id)

    batch.between_steps = between
    batch.add("a", req)
    batch.add("b", replace(req, prompt="y", seed=2))
    assert len(batch) == 2 and batch.can_join(req)  # room for two more before it starts
    assert batch.step() == []
    assert loaded.pipeline.steps_run == 3  # stopped at the next diffusers step

    kept = WholeCallBatch(loaded, max_images=4)
    kept.add("a", req)
    kept.add("b", req)
    assert [j for j, _ in kept.step()] == ["a", "b"]
    assert not kept.can_join(req)  # a whole call takes nobody once it has started


# -- the real engine process -----------------------------------------------------------------
def marker_hook(jobs: list) -> None:
    """before_batch in the engine process. A prompt "hang:<path>" writes <path> (the engine's
    pid) and hangs the step until the process is killed; "slow:<path>" writes <path> at its
    first step and slows each step by 50 ms, so a client can leave mid-batch."""
    for job in jobs:
        kind, _, path = job.request.prompt.partition(":")
        if kind == "hang":
            Path(path).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        if kind == "slow":
            if not Path(path).exists():
                Path(path).write_text(str(os.getpid()))
            time.sleep(0.05)


@pytest.fixture(scope="module")
def process_server(cache_dir: Path) -> Iterator[Server]:
    def setup(qds: Any) -> None:
        qds.before_batch = marker_hook

    with running_server(
        cache_dir, engine="process", setup=setup, torch_threads=1, request_timeout=60
    ) as s:
        yield s


def _post(server: Server, body: dict, timeout: float = 60) -> httpx.Response:
    with server.client(timeout=timeout) as c:
        return c.post(IMG, json={"size": "32x32", **body})


def _query(server: Server) -> dict[str, Any]:
    engine = server.qds.engine
    fut = asyncio.run_coroutine_threadsafe(engine.query(), engine._loop)
    return fut.result(30)


def test_process_engine_serves_with_metrics_from_the_engine(process_server: Server) -> None:
    qds = process_server.qds
    assert qds.engine.mode == "process" and qds.engine.pid not in (None, os.getpid())
    r = _post(process_server, {"prompt": "a red circle", "seed": 3})
    assert r.status_code == 200, r.text
    stats = _query(process_server)
    assert stats["pid"] == qds.engine.pid and stats["finished_jobs"] >= 1
    with process_server.client() as c:
        text = c.get("/metrics").text
        models = c.get("/v1/models").json()["data"]
    # Latency and memory per backend, recorded in the engine, exported here.
    assert 'qds_inference_duration_seconds_count{backend="none"' in text
    assert 'qds_model_memory_bytes{backend="none",component="transformer"' in text
    rss = next(line for line in text.splitlines() if line.startswith("qds_engine_resident"))
    assert float(rss.split()[1]) > 50 * 2**20
    assert models[0]["loaded"] and models[0]["storage_bytes"] > 0


def test_client_gone_mid_batch_is_removed_from_the_engine_batch(
    process_server: Server, tmp_path: Path
) -> None:
    marker = tmp_path / "slow"
    before = _query(process_server)
    body = (
        b'{"prompt": "slow:%s", "size": "32x32", "num_inference_steps": 40}' % str(marker).encode()
    )
    sock = socket.create_connection(("127.0.0.1", process_server.port), timeout=30)
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_for(marker.exists, 30, "the request's first step")
    sock.close()  # the client leaves mid-batch
    after = wait_for(
        lambda: (
            (s := _query(process_server))["cancelled"].get("client_gone", 0)
            > before["cancelled"].get("client_gone", 0)
            and s
        ),
        30,
        "the engine's cancellation",
    )
    # Dropped from the running batch (samples dropped), not from the queue, and not finished.
    dropped = after["dropped_images"].get("client_gone", 0)
    assert dropped - before["dropped_images"].get("client_gone", 0) == 1
    assert after["finished_jobs"] == before["finished_jobs"]
    with process_server.client() as c:
        assert 'qds_cancelled_total{reason="client_gone"}' in c.get("/metrics").text


def test_engine_killed_mid_batch_answers_503_restarts_and_serves(
    process_server: Server, tmp_path: Path
) -> None:
    qds = process_server.qds
    marker = tmp_path / "hang"
    old_pid = qds.engine.pid
    with ThreadPoolExecutor(3) as pool:
        hung = pool.submit(_post, process_server, {"prompt": f"hang:{marker}"})
        wait_for(marker.exists, 30, "the engine inside the hung step")
        others = [pool.submit(_post, process_server, {"prompt": f"p{i}"}) for i in range(2)]
        wait_for(lambda: qds.queue_depth() == 2, 10, "two more requests waiting")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        answers = [f.result(30) for f in [hung, *others]]
    for r in answers:
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_unavailable"
        assert "the engine process died (signal 9, SIGKILL); restarting" in err["message"]
    with process_server.client() as c:
        # A fresh engine loads the model again (readiness during that: the next test)...
        wait_for(lambda: c.get("/readyz").status_code == 200, 90, "ready again")
        assert qds.engine.pid != old_pid and qds.engine.restarts == 1
        # ...then the next request succeeds.
        assert c.post(IMG, json={"prompt": "after", "size": "32x32"}).status_code == 200
        assert "qds_engine_restarts_total 1.0" in c.get("/metrics").text


def test_readiness_reports_the_engine_death(process_server: Server) -> None:
    """/readyz turns 503 with the reason at once when the engine dies (observed before the
    restart completes: the kill is answered on the event loop before any new load)."""
    qds = process_server.qds
    seen: list[tuple[int, str]] = []
    old_pid = qds.engine.pid

    async def watch() -> None:
        os.kill(old_pid, signal.SIGKILL)
        while qds.engine.pid == old_pid or not qds.engine.ready:
            if not qds.ready:
                seen.append((503, qds.reason))
            await asyncio.sleep(0.01)
        seen.append((200, qds.reason))

    asyncio.run_coroutine_threadsafe(watch(), qds.engine._loop).result(120)
    assert seen[0][0] == 503 and "died (signal 9, SIGKILL)" in seen[0][1]
    assert seen[-1] == (200, "ready")
    with process_server.client() as c:
        assert c.get("/readyz").status_code == 200


def test_a_hung_engine_is_killed_answered_503_and_restarted(
    cache_dir: Path, tmp_path: Path
) -> None:
    """QDS_ENGINE_STALL_TIMEOUT: a request slower than the limit but stepping is left alone
    (the engine says it is alive between steps); a step that never returns is not."""

    def setup(qds: Any) -> None:
        qds.before_batch = marker_hook

    with running_server(
        cache_dir, engine="process", setup=setup, engine_stall_timeout=2, request_timeout=60
    ) as server:
        qds = server.qds
        old_pid = qds.engine.pid
        slow = tmp_path / "slow"
        start = time.monotonic()
        r = _post(server, {"prompt": f"slow:{slow}", "num_inference_steps": 50})
        assert r.status_code == 200, r.text
        assert time.monotonic() - start > 2.5  # longer than the limit, and not killed
        assert qds.engine.pid == old_pid

        hang = tmp_path / "hang"
        start = time.monotonic()
        r = _post(server, {"prompt": f"hang:{hang}"})
        waited = time.monotonic() - start
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_unavailable"
        assert "sent no sign of life for" in err["message"]
        assert "(QDS_ENGINE_STALL_TIMEOUT=2): it is stopped or hung" in err["message"]
        # Answered when the stall is found, before the kill's exit status is known.
        assert "the engine was killed" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert 2 < waited < 30
        with server.client() as c:
            wait_for(lambda: c.get("/readyz").status_code == 200, 90, "ready again")
            assert qds.engine.pid != old_pid and qds.engine.restarts == 1
            assert c.post(IMG, json={"prompt": "after", "size": "32x32"}).status_code == 200


def test_sigterm_finishes_requests_in_flight_and_stops_the_engine(
    cache_dir: Path, tmp_path: Path
) -> None:
    """`qdserve serve` as users run it: SIGTERM with requests in flight answers them, then
    the engine and the server exit; nothing hangs."""
    port = free_port()
    env = {
        **os.environ,
        "QDS_CACHE_DIR": str(cache_dir),
        "QDS_TORCH_THREADS": "1",
        "QDS_LOG_LEVEL": "INFO",
        "QDS_PORT": str(port),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "qdserve"), "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 120, "qdserve serve ready")
        body = {"prompt": "x", "size": "32x32", "num_inference_steps": 30}
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url + IMG, json=body, timeout=60) for _ in range(3)]
            wait_for(lambda: _inflight(url) == 3, 30, "three requests in flight")
            proc.send_signal(signal.SIGTERM)
            statuses = [f.result(60).status_code for f in futures]
        assert statuses == [200, 200, 200]
        # uvicorn re-raises the signal it caught once its graceful shutdown is complete.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        output = log.read_text()
        assert "Application shutdown complete" in output, output[-2000:]
        assert "Traceback" not in output, output[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # The engine process went with it.
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
    )
    assert children.stdout.strip() == ""


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _inflight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("qds_inflight_requests "))
    return float(line.split()[1])


# -- on a GPU --------------------------------------------------------------------------------
def cuda_oom_hook(jobs: list) -> None:
    """before_batch in the engine process: a prompt "cuda-oom" allocates blocks on the device
    until CUDA refuses, holding them in the failing frame (as a real forward holds its
    activations), so only a release after the handler gives them back."""
    if any(job.request.prompt == "cuda-oom" for job in jobs):
        held = []
        while True:
            held.append(torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda"))


@pytest.mark.gpu
def test_real_cuda_out_of_memory_is_503_and_the_memory_is_released(cache_dir: Path) -> None:
    def setup(qds: Any) -> None:
        qds.before_batch = cuda_oom_hook

    with running_server(
        cache_dir, quant={"device": "cuda"}, engine="process", setup=setup, request_timeout=120
    ) as server:
        assert _post(server, {"prompt": "warm"}).status_code == 200
        before = _query(server)["gpu"]["cuda:0"]
        r = _post(server, {"prompt": "cuda-oom"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
        # What to do, not torch's allocator text (that goes to the log with the request id).
        message = r.json()["error"]["message"]
        assert "GiB" not in message and "Tried to allocate" not in message, message
        after = _query(server)["gpu"]["cuda:0"]
        # Everything the failed step allocated is free again, and handed back to the device.
        assert after["allocated"] <= before["allocated"] + 64 * 2**20, (before, after)
        assert after["reserved"] <= before["reserved"] + 64 * 2**20, (before, after)
        assert after["peak"] > before["total"] // 2  # the step really filled the device
        assert _post(server, {"prompt": "after"}).status_code == 200
        with server.client() as c:
            text = c.get("/metrics").text
        assert 'qds_gpu_memory_allocated_bytes{device="cuda:0"}' in text
        assert "qds_gpu_oom_total 1.0" in text
