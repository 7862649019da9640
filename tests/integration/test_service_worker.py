"""The request path through a real server to the engine core (run inline here): queue overflow,
timeouts, disconnects, graceful shutdown, and step-level batching on the embedded model
(requests joining a running batch at a step boundary, same images as alone, only compatible
requests sharing a step, the image cap).

A gate in the scheduler's `before_batch` hook holds the engine inside a step, so queue states
and step boundaries are reached deterministically instead of by racing a slow model. What ran
is read from the engine's own accounting (its step log and cancel counters).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_service_support import Server, running_server

IMG = "/v1/images/generations"
pytestmark = pytest.mark.timeout(180)


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


class Gate:
    """Holds the engine before its `at`-th step (from when it is installed) until opened.

    With `pump`, the held engine keeps reading its pipe (new requests reach its queue), so a
    test can wait until they are there before opening the gate."""

    def __init__(self, at: int = 1, pump: Callable[[], None] | None = None) -> None:
        self.at = at
        self.pump = pump
        self.event = threading.Event()
        self.arrived = 0

    def __call__(self, _jobs: list) -> None:
        self.arrived += 1
        if self.arrived != self.at:
            return
        deadline = time.monotonic() + 30
        while not self.event.wait(0.01) and time.monotonic() < deadline:
            if self.pump is not None:
                self.pump()


@pytest.fixture(scope="module")
def limited(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, max_queue=1, max_batch=1, request_timeout=3.0) as s:
        yield s


def _post(server: Server, body: dict, timeout: float = 60) -> httpx.Response:
    with server.client(timeout=timeout) as c:
        return c.post(IMG, json=body)


def test_queue_full_429_and_timeouts_504(limited: Server) -> None:
    scheduler = limited.qds.scheduler
    gate = Gate()
    scheduler.before_batch = gate
    started = scheduler.started_jobs
    cancelled = dict(scheduler.cancelled)
    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(_post, limited, {"prompt": "first"})
            # First is in its first step (held), and the HTTP side has read its start: until
            # then it still counts as queued and the next request would meet a full queue.
            wait_for(lambda: gate.arrived == 1 and limited.qds.queue_depth() == 0)
            queued = pool.submit(_post, limited, {"prompt": "second"})
            wait_for(lambda: limited.qds.queue_depth() == 1)
            # Queue (size 1) full: rejected at once with Retry-After.
            r = _post(limited, {"prompt": "third"})
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            # Both time out (3 s): the queued one is removed from the queue, never run.
            q = queued.result(20)
            assert q.status_code == 504 and q.json()["error"]["code"] == "timeout"
            assert "removed from the queue" in q.json()["error"]["message"]
            run = running.result(20)
            assert run.status_code == 504 and "while running" in run.json()["error"]["message"]
            gate.event.set()
            # The engine dropped both: the running one from its batch at the next step.
            wait_for(lambda: scheduler.cancelled["timeout"] - cancelled.get("timeout", 0) == 2)
            assert scheduler.dropped_images["timeout"] >= 1
            assert scheduler.started_jobs == started + 1  # only the first ever started
    finally:
        scheduler.before_batch = None
        gate.event.set()
    assert _post(limited, {"prompt": "after"}).status_code == 200


def test_client_gone_before_start_costs_no_compute(limited: Server) -> None:
    scheduler = limited.qds.scheduler
    gate = Gate()
    scheduler.before_batch = gate
    started = scheduler.started_jobs
    gone = scheduler.cancelled["client_gone"]
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_post, limited, {"prompt": "first"})
            wait_for(lambda: gate.arrived == 1 and limited.qds.queue_depth() == 0)
            # This client gives up after 0.5 s, while its request is still queued.
            with pytest.raises(httpx.ReadTimeout):
                _post(limited, {"prompt": "impatient"}, timeout=0.5)
            wait_for(lambda: limited.qds.queue_depth() == 0, timeout=5)
            gate.event.set()
            assert running.result(20).status_code == 200
            wait_for(lambda: scheduler.cancelled["client_gone"] == gone + 1)
            assert scheduler.started_jobs == started + 1  # the impatient request never ran
    finally:
        scheduler.before_batch = None
        gate.event.set()


def _one_running_one_queued(
    server: Server, gate: Gate, pool: ThreadPoolExecutor
) -> tuple[Future, Future]:
    """Request a held inside its step by `gate`, request b queued behind it (max_batch 1)."""
    server.qds.scheduler.before_batch = gate
    running = pool.submit(_post, server, {"prompt": "a", "seed": 1})
    wait_for(lambda: gate.arrived == 1 and server.qds.queue_depth() == 0)  # a seen started
    queued = pool.submit(_post, server, {"prompt": "b", "seed": 2})
    wait_for(lambda: server.qds.queue_depth() == 1)
    return running, queued


def test_graceful_shutdown_finishes_running_and_queued(cache_dir: Path) -> None:
    gate = Gate()
    with running_server(cache_dir, max_queue=4, max_batch=1) as server:
        pool = ThreadPoolExecutor(2)
        running, queued = _one_running_one_queued(server, gate, pool)
        server.server.should_exit = True  # what SIGTERM does
        # Stopped accepting: new connections are refused.
        wait_for(lambda: _refused(server.url))
        gate.event.set()
        assert running.result(30).status_code == 200
        assert queued.result(30).status_code == 200
        pool.shutdown()
    assert not server.qds.engine.accepting
    engine_thread = server.qds.engine._handle
    assert isinstance(engine_thread, threading.Thread) and not engine_thread.is_alive()


def test_requests_unfinished_at_the_shutdown_deadline_get_a_json_503(cache_dir: Path) -> None:
    """Defect: uvicorn cancels what is still running when QDS_SHUTDOWN_TIMEOUT runs out and
    writes a plain-text 500; service.server answers those requests first with a 503."""
    gate = Gate()  # never opened before the deadline: the running request cannot finish
    with running_server(cache_dir, max_queue=4, max_batch=1, shutdown_timeout=1.5) as server:
        pool = ThreadPoolExecutor(2)
        running, queued = _one_running_one_queued(server, gate, pool)
        stop = time.monotonic()
        server.server.should_exit = True  # what SIGTERM does
        answers = [running.result(30), queued.result(30)]
        waited = time.monotonic() - stop
        gate.event.set()
        pool.shutdown()
    for r in answers:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "shutting_down"
        assert "QDS_SHUTDOWN_TIMEOUT ran out" in error["message"]
        assert r.headers["x-request-id"]
    # Answered near the deadline (1.5 s minus the 0.5 s margin), not at once, not never.
    assert 0.8 < waited < 10


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:  # accepted just before the listener closed: ask again
        return False
    return False


# -- step-level batching ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir, max_batch=4, max_queue=16, preload=["quanto:int8"], allow_on_demand_load=False
    ) as s:
        yield s


def _image(resp: httpx.Response, i: int = 0) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = base64.b64decode(resp.json()["data"][i]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def _submit_held(server: Server, bodies: list[dict], *, hold_at: int = 1) -> list[httpx.Response]:
    """Run a blocker, hold the engine inside its `hold_at`-th step, queue all bodies, release:
    they join at the next step boundary."""
    scheduler = server.qds.scheduler
    gate = Gate(at=hold_at, pump=scheduler.between_steps)
    scheduler.before_batch = gate
    try:
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            blocker = pool.submit(
                _post, server, {"prompt": "blocker", "size": "32x32", "num_inference_steps": 6}
            )
            wait_for(lambda: gate.arrived == hold_at)
            futures: list[Future] = []
            for body in bodies:
                futures.append(pool.submit(_post, server, body))
                # Keep arrival order deterministic; in the engine's queue before the boundary.
                n = len(futures)
                wait_for(lambda n=n: scheduler.depth() == n)
            gate.event.set()
            assert blocker.result(60).status_code == 200
            return [f.result(60) for f in futures]
    finally:
        scheduler.before_batch = None
        gate.event.set()


def _batch_images(resp: httpx.Response) -> int:
    # The response's `timings` extension (`usage` is OpenAI's token counts).
    return resp.json()["timings"]["batch_images"]


def _steps_since(server: Server, start: int) -> list[list[tuple]]:
    return list(server.qds.scheduler.step_log)[start:]


# Image equality tolerance between a request run in a batch and the same seed alone: at most
# 2 levels of 8-bit pixels (tests/backends/test_stepping.py states the measured differences).
TOLERANCE = 2


def test_requests_join_a_running_batch_and_get_their_solo_images(batching: Server) -> None:
    bodies = [
        {"prompt": p, "seed": s, "size": "32x32", "num_inference_steps": 4}
        for p, s in (("a red circle", 5), ("a blue square", 6), ("a green star", 7))
    ]
    start = len(batching.qds.scheduler.step_log)
    # Held inside the blocker's 2nd of 6 steps: the three join at its 3rd, not after its 6th.
    joined = _submit_held(batching, bodies, hold_at=2)
    steps = _steps_since(batching, start)
    sizes = [len(step) for step in steps]
    assert sizes == [1, 1, 4, 4, 4, 4], sizes  # the joiners' 4 steps end with the blocker's
    assert all(_batch_images(r) == 4 for r in joined)
    for body, resp in zip(bodies, joined, strict=True):
        solo = _post(batching, body)
        assert _batch_images(solo) == 1
        diff = np.abs(_image(resp) - _image(solo)).max()
        assert diff <= TOLERANCE, (body, diff)


def test_batch_respects_max_batch_images(batching: Server) -> None:
    bodies = [
        {"prompt": "x", "seed": i, "n": 2, "size": "32x32", "num_inference_steps": 6}
        for i in range(3)
    ]
    start = len(batching.qds.scheduler.step_log)
    results = _submit_held(batching, bodies)
    assert all(r.status_code == 200 for r in results)
    steps = _steps_since(batching, start)
    images = [sum(n for _, _, n in step) for step in steps]
    assert max(images) == 4 and all(n <= 4 for n in images), images


def test_incompatible_requests_never_share_a_step(batching: Server) -> None:
    bodies = [
        {"prompt": "a", "seed": 1, "size": "32x32"},
        {"prompt": "b", "seed": 2, "size": "16x16"},  # other size
        {"prompt": "c", "seed": 3, "size": "32x32", "num_inference_steps": 2},  # other steps: ok
        {"prompt": "d", "seed": 4, "size": "32x32", "quant_backend": "quanto"},  # other model
        {"prompt": "e", "seed": 5, "size": "32x32", "guidance_scale": 1.0},  # other guidance
        {"prompt": "f", "seed": 6, "size": "32x32", "negative_prompt": "blur"},  # CFG mode
    ]
    start = len(batching.qds.scheduler.step_log)
    results = _submit_held(batching, bodies)
    assert [r.status_code for r in results] == [200] * 6
    assert results[3].json()["backend"] == "quanto"
    steps = _steps_since(batching, start)
    jobs = sorted({job for step in steps for _, job, _ in step}, key=int)
    blocker, a, b, c, d, e, f = jobs  # job ids are issued in submission order
    kinds = {blocker: 0, a: 0, c: 0, b: 1, d: 2, e: 3, f: 4}
    for step in steps:
        assert len({kinds[job] for _, job, _ in step}) == 1, step
    # A request with other steps but the same size and guidance shares steps (each sample
    # keeps its own schedule).
    assert any({a, c} <= {job for _, job, _ in step} for step in steps)


def test_lone_request_on_an_idle_engine_runs_alone(batching: Server) -> None:
    start = len(batching.qds.scheduler.step_log)
    resp = _post(batching, {"prompt": "alone", "size": "32x32", "num_inference_steps": 3})
    assert resp.status_code == 200
    assert _batch_images(resp) == 1
    assert [len(step) for step in _steps_since(batching, start)] == [1, 1, 1]


# -- the whole-call fallback (pipelines that cannot step) ------------------------------------


def _whole_call(loaded, *, max_images, prompt_cache=None, on_step=None, between_steps=None):
    from engine.batches import WholeCallBatch

    return WholeCallBatch(
        loaded, max_images=max_images, on_step=on_step, between_steps=between_steps
    )


def test_whole_call_fallback_batches_what_queued_during_the_previous_call(
    cache_dir: Path,
) -> None:
    from pipelines.generate import batch_key

    def setup(qds) -> None:
        qds.make_batch = _whole_call
        qds.kind_of = batch_key

    with running_server(cache_dir, max_batch=4, max_queue=8, setup=setup) as server:
        bodies = [
            {"prompt": p, "seed": s, "size": "32x32", "num_inference_steps": 4}
            for p, s in (("a red circle", 5), ("a blue square", 6))
        ]
        start = len(server.qds.scheduler.step_log)
        batched = _submit_held(server, bodies)
        # One entry per pipeline call: the blocker alone, then the two queued meanwhile.
        assert [len(call) for call in _steps_since(server, start)] == [1, 2]
        for body, resp in zip(bodies, batched, strict=True):
            assert _batch_images(resp) == 2
            solo = _post(server, body)
            assert np.abs(_image(resp) - _image(solo)).max() <= TOLERANCE
