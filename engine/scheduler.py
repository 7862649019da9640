"""The engine's scheduler: a FIFO queue of leased jobs and the running batches, stepped one
step at a time on the engine's main thread.

At every step boundary (`admit`) queued jobs join a running batch of the same model variant
and compatibility key (`batches.compat_key`: size, guidance, CFG mode) while it has room
(`max_batch` images), or start a new batch when no batch of their kind runs. A job whose kind
is running but full waits for room (one batch per kind, as TGI and vLLM keep one running
batch, so a device's batched forward is not split in two), except with `lanes` > 1 (CPU,
`engine.lanes`): then up to `lanes` step batches of a kind run, each capped at its share
of `max_batch`, and batches of one model step at the same time, one per lane thread. Batches
of different kinds take turns, one step each (round robin), so a 1024x1024 request does not
stall a 256x256 one for its whole run. A lone request starts at once: there is no batching window.

Cancellation (`cancel`) removes a job from the queue, or its samples from the running batch
before the next step; `dropped_images` and `cancelled` count both, by reason.

Out-of-memory: the step's exception is caught, its message kept, and memory is released
after the `except` block has ended. Inside it, the traceback still references the frames of
the failed call and through them its tensors, so `gc.collect()` / `empty_cache()` there free
nothing (the defect this replaces).
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import messages as m
from engine.batches import (
    Batch,
    EditBatch,
    compat_key,
    is_step_batch,
    new_batch,
    uses_stepping,
)
from engine.failures import EngineError, Failure, step_failure
from engine.lanes import Lanes, classify
from pipelines import lora
from pipelines.edit import EditRequest

if TYPE_CHECKING:
    from engine.cache import Lease
    from engine.keys import ModelKey
    from pipelines.generate import GenerationRequest
    from pipelines.loader import LoadedPipeline
    from pipelines.prompt_cache import PromptCache

log = logging.getLogger("qdserve.scheduler")

# Batches of different kinds stepping in turn; more kinds wait in the queue.
MAX_RUNNING_BATCHES = 4
# With lanes, the images a kind's batch takes before the next lane opens (`Scheduler._pick`).
LANE_FILL = 4

BatchFactory = Callable[..., Batch]
KindOf = Callable[["LoadedPipeline", "GenerationRequest"], tuple[Any, ...]]


@dataclass(eq=False)
class Job:
    job_id: str
    key: ModelKey
    request: GenerationRequest
    lease: Lease
    progress: bool = False
    previews: tuple[int, ...] = ()
    owner: str = ""  # who sent it: the queue is served in turn across owners
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    _closed: bool = False

    @property
    def images(self) -> int:
        return self.request.num_images

    @property
    def loaded(self) -> LoadedPipeline:
        return self.lease.loaded

    def close(self) -> None:
        """Give the cache entry back (once): the job no longer needs its pipeline."""
        if not self._closed:
            self._closed = True
            self.lease.release()


def fair_order(queue: Iterable[Job], last_admitted: dict[str, int] | None = None) -> list[Job]:
    """The queue in turn across owners: each owner's first job, then each one's second, and
    so on; FIFO within an owner. Owners take their turns least recently served first
    (`last_admitted`: owner -> a counter value at its last admission), then in the order they
    first appear. With one owner (no API keys) this is the queue itself."""
    by_owner: dict[str, list[Job]] = {}
    for job in queue:
        by_owner.setdefault(job.owner, []).append(job)
    if len(by_owner) <= 1:
        return list(queue)
    served = last_admitted or {}
    owners = sorted(by_owner, key=lambda o: served.get(o, -1))  # stable: first appearance
    lists = [by_owner[o] for o in owners]
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


@dataclass(eq=False)
class Running:
    key: ModelKey
    kind: tuple[Any, ...]
    batch: Batch
    jobs: dict[str, Job] = field(default_factory=dict)


def release_memory() -> None:
    """Collect the failed call's objects (reference cycles included) and hand cached device
    blocks and freed heap pages back. Call it after the `except` block has ended."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from engine.cache import _trim_heap

    _trim_heap()


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        emit: Callable[[object], None],
        metrics: Any = None,
        prompt_cache: PromptCache | None = None,
        make_batch: BatchFactory = new_batch,
        kind_of: KindOf = compat_key,
        max_running: int = MAX_RUNNING_BATCHES,
        lanes: int = 1,
    ) -> None:
        self.max_batch = max_batch
        self.lanes = lanes
        self.emit = emit
        self.metrics = metrics
        self.prompt_cache = prompt_cache
        self.make_batch = make_batch
        self.kind_of = kind_of
        self.max_running = max_running
        self.queue: collections.deque[Job] = collections.deque()
        self.running: list[Running] = []
        self._served: dict[str, int] = {}  # owner -> started_jobs at its last admission
        self._turn = 0
        self._stepping = False
        self._current: Running | None = None  # the batch being stepped
        # Test hook, called on the engine thread before each step with the batch's jobs.
        self.before_batch: Callable[[list[Job]], None] | None = None
        # Set by the engine: read the pipe during a whole pipeline call (cancellations).
        self.between_steps: Callable[[], None] | None = None
        # Accounting (the engine's own word on what ran; tests read it through `stats`).
        self.steps_run = 0
        self.active = 0
        self.max_concurrent = 0
        self.step_log: collections.deque[list[tuple[ModelKey, str, int]]] = collections.deque(
            maxlen=1000
        )
        self.started_jobs = 0
        self.finished_jobs = 0
        self.failed_jobs = 0
        self.cancelled: collections.Counter[str] = collections.Counter()
        self.dropped_images: collections.Counter[str] = collections.Counter()
        self.ooms = 0

    # -- queries ---------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self.queue)

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def stats(self) -> dict[str, Any]:
        return {
            "steps_run": self.steps_run,
            "max_concurrent": self.max_concurrent,
            "started_jobs": self.started_jobs,
            "finished_jobs": self.finished_jobs,
            "failed_jobs": self.failed_jobs,
            "cancelled": dict(self.cancelled),
            "dropped_images": dict(self.dropped_images),
            "ooms": self.ooms,
            "queued": len(self.queue),
            "running": {j: r.key.variant_id for r in self.running for j in r.jobs},
            "step_log": [list(s) for s in list(self.step_log)[-50:]],
        }

    # -- jobs in and out -------------------------------------------------------------------
    def enqueue(self, job: Job) -> None:
        job.state = "queued"
        job.enqueued_at = time.perf_counter()
        self.queue.append(job)

    def cancel(self, job_id: str, reason: str) -> m.Cancelled | None:
        """Remove a job before its end; None when it is not here (finished, unknown)."""
        for job in self.queue:
            if job.job_id == job_id:
                self.queue.remove(job)
                return self._cancelled(job, reason, "queued", 0)
        for run in self.running:
            job = run.jobs.pop(job_id, None)
            if job is not None:
                run.batch.remove(job_id)
                self.dropped_images[reason] += job.images
                if not run.jobs and not self._stepping:
                    self.running.remove(run)
                return self._cancelled(job, reason, "running", job.images)
        return None

    def _cancelled(self, job: Job, reason: str, where: str, images: int) -> m.Cancelled:
        job.state = "cancelled"
        job.close()
        self.cancelled[reason] += 1
        if self.metrics is not None:
            self.metrics.cancelled.labels(reason).inc()
        log.info("job %s cancelled (%s) while %s", job.job_id, reason, where)
        event = m.Cancelled(job.job_id, where, images)
        self.emit(event)
        return event

    def fail_queued(self, failure: Failure | EngineError) -> None:
        while self.queue:
            self._fail(self.queue.popleft(), failure)

    def cancel_running(self, reason: str) -> None:
        for run in list(self.running):
            for job_id in list(run.jobs):
                self.cancel(job_id, reason)

    def _fail(self, job: Job, failure: Failure | EngineError) -> None:
        job.state = "failed"
        job.close()
        self.failed_jobs += 1
        self.emit(m.Failed(job.job_id, failure))

    # -- the step boundary -----------------------------------------------------------------
    def admit(self) -> None:
        """Move queued jobs into running batches (FIFO within an owner, in turn across owners:
        one owner's long queue does not keep another's next job waiting behind it; a job that
        must wait keeps its place, later ones of another kind may pass it)."""
        if not self.queue:
            return
        now = time.perf_counter()
        for job in fair_order(self.queue, self._served):
            try:
                # One forward runs with one LoRA adapter set: it is part of every batch kind.
                kind = (self.kind_of(job.loaded, job.request), job.request.lora)
            except Exception as exc:  # resolving the key should not fail; never stall the queue
                self.queue.remove(job)
                self._fail(
                    job, step_failure(None, f"{type(exc).__name__}: {exc}", job.key.variant_id)
                )
                continue
            same = [r for r in self.running if r.key == job.key and r.kind == kind]
            can_open = len(same) < self._lanes_for(job) and len(self.running) < self.max_running
            target = self._pick(same, job, can_open)
            if target is None:
                if same and not can_open and job.images <= self.max_batch:
                    continue  # its kind runs but is full: join when a sample leaves
                if len(self.running) >= self.max_running:
                    continue
                target = Running(job.key, kind, self._new_batch(job))
                self.running.append(target)
            self._join(target, job, now)

    def _pick(self, same: list[Running], job: Job, can_open: bool) -> Running | None:
        """The running batch of its kind a job joins (None: open a new one, or wait).

        Without lanes, the kind's batch while it has room. With lanes, a batch still under
        `LANE_FILL` images first; then a new lane while one is free; then the emptiest batch
        with room. Opening lanes before a batch holds 4 (two batches of ~2 at concurrency 4)
        lost to LitServe's batch of 4 on both threads in a bench peer run (2-core CPU; issue
        11's note); past 4, two half-full lanes beat one full one (bench batch-size).
        """
        room = [r for r in same if r.batch.can_join(job.request)]
        if self._lanes_for(job) == 1:
            return room[0] if room else None
        under = [r for r in room if len(r.batch) < LANE_FILL]
        if under:
            return under[0]
        if can_open:
            return None
        return min(room, key=lambda r: len(r.batch), default=None)

    def _new_batch(self, job: Job) -> Batch:
        key = job.key

        def on_step(_step: int, seconds: float) -> None:
            if self.metrics is not None:
                self.metrics.step_duration.labels(
                    key.model, key.backend, key.quant_type or ""
                ).observe(seconds)
            # A whole pipeline call reports its steps as they end (between_steps sends them),
            # so streamed progress does not wait for the call's end.
            run = self._current
            if run is not None:
                for j in run.jobs.values():
                    if j.progress:
                        done, total = run.batch.progress(j.job_id)
                        self.emit(m.Progress(j.job_id, done, total))

        # With lanes every batch takes its share of the limit, whole-call ones included: the
        # CPU's auto limit is 8 per lane, and a whole-call batch (edits, SD3, SDXL) has one.
        share = max(1, self.max_batch // self.lanes)
        if isinstance(job.request, EditRequest):
            # Edits run whole-call in a batch kind of their own, whatever the factory.
            return EditBatch(
                job.loaded,
                max_images=max(share, job.images),
                on_step=on_step,
                between_steps=self._between_steps,
            )
        return self.make_batch(
            job.loaded,
            max_images=max(share, job.images),
            prompt_cache=self.prompt_cache,
            on_step=on_step,
            between_steps=self._between_steps,
        )

    def _lanes_for(self, job: Job) -> int:
        """How many batches of the job's kind may run: lanes only split step batches."""
        lanes_apply = not isinstance(job.request, EditRequest) and uses_stepping(job.loaded)
        return self.lanes if self.lanes > 1 and lanes_apply else 1

    def _between_steps(self) -> None:
        if self.between_steps is not None:
            self.between_steps()

    def _join(self, run: Running, job: Job, now: float) -> None:
        self.queue.remove(job)
        oom: str | None = None
        error: str | None = None
        try:
            run.batch.add(job.job_id, job.request)  # encodes the prompt: may fail
        except Exception as exc:
            oom, error = classify(exc)
        if oom is not None or error is not None:
            # Memory is released here, after the handler (see the module docstring).
            if oom is not None:
                self._on_oom(oom, job.images, job.key)
            self._fail(job, step_failure(oom, error, job.key.variant_id))
            if not run.jobs and run in self.running:
                self.running.remove(run)
            return
        job.state = "running"
        job.started_at = now
        run.jobs[job.job_id] = job
        self.started_jobs += 1
        self._served[job.owner] = self.started_jobs
        queued = now - job.enqueued_at
        if self.metrics is not None:
            self.metrics.queue_wait.labels(job.key.backend).observe(queued)
        self.emit(m.Started(job.job_id, queued))

    def step_next(self) -> None:
        """Run one step of the next running batch (round robin), beside the other batches of
        its model that share a lane with it (`lanes` > 1)."""
        if not self.running:
            return
        run = self.running[self._turn % len(self.running)]
        self._turn += 1
        runs = [run, *self._lane_partners(run)]
        jobs = {id(r): list(r.jobs.values()) for r in runs}
        before = {id(r): len(r.batch) for r in runs}
        self.active += len(runs)
        self.max_concurrent = max(self.max_concurrent, self.active)
        for r in runs:
            self.step_log.append([(j.key, j.job_id, j.images) for j in jobs[id(r)]])
        self._stepping = True
        self._current = run if len(runs) == 1 else None
        started = time.perf_counter()
        # A batch whose step fails (its hook or its forward) fails alone; its partners go on.
        outcomes: dict[int, tuple[list, str | None, str | None]] = {}
        try:
            for r in runs:
                try:
                    if self.before_batch is not None:
                        self.before_batch(jobs[id(r)])
                except Exception as exc:
                    outcomes[id(r)] = ([], *classify(exc))
            stepping = [r for r in runs if id(r) not in outcomes]
            if stepping and jobs[id(run)]:  # the batch's adapters (none: the base,
                # bit-exact), shared by its partners (`_lane_partners`); a no-op if unchanged
                lora.activate(jobs[id(run)][0].loaded, jobs[id(run)][0].request.lora)
            if len(stepping) == 1:
                outcomes[id(stepping[0])] = (stepping[0].batch.step(), None, None)
            elif stepping:
                results = Lanes.get(self.lanes).run([r.batch.step for r in stepping], classify)
                outcomes.update(zip(map(id, stepping), results, strict=True))
        except Exception as exc:
            for r in runs:
                outcomes.setdefault(id(r), ([], *classify(exc)))
        finally:
            self.active -= len(runs)
            self._stepping = False
            self._current = None
        # Past the handler: the failed call's frames are gone, so memory can really be freed.
        elapsed = time.perf_counter() - started
        for r in runs:
            self._after_step(r, before[id(r)], elapsed, *outcomes[id(r)])

    def _lane_partners(self, run: Running) -> list[Running]:
        """Other step batches of the same model and adapters that step with `run`, one lane
        each (none without lanes)."""
        if self.lanes < 2 or not is_step_batch(run.batch):
            return []
        partners = [
            r
            for r in self.running
            if r is not run
            and r.key == run.key
            and r.kind[1] == run.kind[1]  # one adapter set per forward
            and is_step_batch(r.batch)
            and r.jobs
        ]
        return partners[: self.lanes - 1]

    def _after_step(
        self,
        run: Running,
        images_before: int,
        elapsed: float,
        finished: list,
        oom: str | None,
        error: str | None,
    ) -> None:
        self.steps_run += 1
        key = run.key
        if oom is not None or error is not None:
            if run in self.running:
                self.running.remove(run)
            if oom is not None:
                self._on_oom(oom, images_before, key)
            else:
                log.error("step failed on %s: %s", key.variant_id, error)
            for job in run.jobs.values():
                self._fail(job, step_failure(oom, error, key.variant_id))
            run.jobs.clear()
            return
        labels = (key.model, key.backend, key.quant_type or "")
        if self.metrics is not None and not getattr(run.batch, "reports_steps", False):
            self.metrics.step_duration.labels(*labels).observe(elapsed)
        self._count_cache_blocks(run.batch)
        now = time.perf_counter()
        for job_id, result in finished:
            job = run.jobs.pop(job_id, None)
            if job is None:  # cancelled during the call
                continue
            job.state = "done"
            seconds = now - job.started_at
            result.inference_seconds = seconds
            self.finished_jobs += 1
            if self.metrics is not None:
                self.metrics.inference_duration.labels(
                    *labels, lora.label(job.request.lora)
                ).observe(seconds)
                self.metrics.images.labels(key.backend).inc(job.images)
            self.emit(m.Finished(job_id, result, job.started_at - job.enqueued_at, images_before))
            job.close()
        for job in run.jobs.values():
            if job.progress or job.previews:
                self._report_progress(run, job)
        if not run.jobs and run in self.running:
            self.running.remove(run)

    def _count_cache_blocks(self, batch: Batch) -> None:
        """The step cache's block runs of the step just run (pipelines.step_cache.Counts)."""
        counts = getattr(batch, "cache_counts", None)
        if counts is None:
            return
        computed, skipped = counts.take()
        if self.metrics is not None and (computed or skipped):
            self.metrics.step_cache_blocks.labels("computed").inc(computed)
            self.metrics.step_cache_blocks.labels("skipped").inc(skipped)

    def _report_progress(self, run: Running, job: Job) -> None:
        done, total = run.batch.progress(job.job_id)
        if job.progress:
            self.emit(m.Progress(job.job_id, done, total))
        preview = getattr(run.batch, "latents_preview", None)
        if done in job.previews and preview is not None:
            # pipelines.previews' fitted map (a VAE decode while it learns); a whole-call
            # batch has no previews. A failed preview costs the stream a partial image, never
            # the job or the engine loop.
            try:
                images = preview(job.job_id)
            except Exception as exc:
                log.warning("preview of job %s after step %d failed: %r", job.job_id, done, exc)
                return
            self.emit(m.Preview(job.job_id, job.previews.index(done), done, total, images))

    def _on_oom(self, message: str, images: int, key: ModelKey) -> None:
        release_memory()
        self.ooms += 1
        if self.metrics is not None:
            self.metrics.gpu_oom.inc()
        log.error("out of memory running %d image(s) on %s: %s", images, key.variant_id, message)
