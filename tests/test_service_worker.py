"""The inference worker through a real server: queue overflow, timeouts, disconnects,
graceful shutdown, micro-batching (equivalence and batch formation rules).

A gate in the worker's `before_batch` hook holds the (real) pipeline call, so queue states are
reached deterministically instead of by racing a slow model.
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
    """Holds the worker before each pipeline call until opened; counts arrivals."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.arrived = 0

    def __call__(self, _batch: list) -> None:
        self.arrived += 1
        self.event.wait(30)


@pytest.fixture(scope="module")
def limited(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, max_queue=1, request_timeout=3.0) as s:
        yield s


def _post(server: Server, body: dict, timeout: float = 60) -> httpx.Response:
    with server.client(timeout=timeout) as c:
        return c.post(IMG, json=body)


def test_queue_full_429_and_timeouts_504(limited: Server) -> None:
    worker = limited.qds.worker
    gate = Gate()
    worker.before_batch = gate
    calls = worker.pipeline_calls
    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(_post, limited, {"prompt": "first"})
            wait_for(lambda: gate.arrived == 1)  # first is running (held at the gate)
            queued = pool.submit(_post, limited, {"prompt": "second"})
            wait_for(lambda: worker.depth() == 1)
            # Queue (size 1) full: rejected at once with Retry-After.
            r = _post(limited, {"prompt": "third"})
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            # Both time out (3 s): the queued one is removed from the queue, never run.
            q = queued.result(20)
            assert q.status_code == 504 and q.json()["error"]["code"] == "timeout"
            assert "removed from the queue" in q.json()["error"]["message"]
            assert worker.depth() == 0
            run = running.result(20)
            assert run.status_code == 504
            gate.event.set()
            # Only the first ever reached the pipeline.
            wait_for(lambda: worker.pipeline_calls == calls + 1)
            time.sleep(0.3)
            assert worker.pipeline_calls == calls + 1
    finally:
        worker.before_batch = None
        gate.event.set()
    assert _post(limited, {"prompt": "after"}).status_code == 200


def test_client_gone_before_start_costs_no_compute(limited: Server) -> None:
    worker = limited.qds.worker
    gate = Gate()
    worker.before_batch = gate
    calls = worker.pipeline_calls
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_post, limited, {"prompt": "first"})
            wait_for(lambda: gate.arrived == 1)
            # This client gives up after 0.5 s, while its request is still queued.
            with pytest.raises(httpx.ReadTimeout):
                _post(limited, {"prompt": "impatient"}, timeout=0.5)
            wait_for(lambda: worker.depth() == 0, timeout=5)
            gate.event.set()
            assert running.result(20).status_code == 200
            time.sleep(0.3)
            assert worker.pipeline_calls == calls + 1  # the impatient request never ran
    finally:
        worker.before_batch = None
        gate.event.set()


def test_graceful_shutdown_finishes_running_and_queued(cache_dir: Path) -> None:
    gate = Gate()
    with running_server(cache_dir, max_queue=4) as server:
        server.qds.worker.before_batch = gate
        pool = ThreadPoolExecutor(2)
        running = pool.submit(_post, server, {"prompt": "a", "seed": 1})
        wait_for(lambda: gate.arrived == 1)
        queued = pool.submit(_post, server, {"prompt": "b", "seed": 2})
        wait_for(lambda: server.qds.worker.depth() == 1)
        server.server.should_exit = True  # what SIGTERM does
        time.sleep(0.5)
        # Stopped accepting: new connections are refused.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=2)
        gate.event.set()
        assert running.result(30).status_code == 200
        assert queued.result(30).status_code == 200
        pool.shutdown()
    assert not server.qds.worker.accepting


# -- micro-batching ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir,
        batch_window_ms=400,
        max_batch=4,
        max_queue=16,
        preload=["quanto:int8"],
        allow_on_demand_load=False,
    ) as s:
        yield s


def _image(resp: httpx.Response, i: int = 0) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = base64.b64decode(resp.json()["data"][i]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def _submit_held(server: Server, bodies: list[dict]) -> list[httpx.Response]:
    """Hold the worker, queue all bodies, release: the worker then forms its batches."""
    worker = server.qds.worker
    gate = Gate()
    worker.before_batch = gate
    try:
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            blocker = pool.submit(_post, server, {"prompt": "blocker", "size": "32x32"})
            wait_for(lambda: gate.arrived == 1)
            futures: list[Future] = []
            for body in bodies:
                futures.append(pool.submit(_post, server, body))
                # Keep arrival order deterministic.
                n = len(futures)
                wait_for(lambda n=n: worker.depth() == n)
            gate.event.set()
            assert blocker.result(60).status_code == 200
            return [f.result(60) for f in futures]
    finally:
        worker.before_batch = None
        gate.event.set()


# Image equality tolerance between a batched image and the same seed alone: 8-bit pixels may
# differ by batched-matmul rounding; we allow at most 2 levels.
TOLERANCE = 2


def test_batched_images_equal_solo_images(batching: Server) -> None:
    worker = batching.qds.worker
    bodies = [
        {"prompt": p, "seed": s, "size": "32x32"}
        for p, s in (("a red circle", 5), ("a blue square", 6), ("a green star", 7))
    ]
    calls = worker.pipeline_calls
    batched = _submit_held(batching, bodies)
    # Blocker alone, then the three together.
    assert worker.pipeline_calls == calls + 2
    assert [n for _, n in worker.batch_log[-1]] == [1, 1, 1]
    assert all(r.json()["usage"]["batch_images"] == 3 for r in batched)
    for body, resp in zip(bodies, batched, strict=True):
        solo = _post(batching, body)
        assert solo.json()["usage"]["batch_images"] == 1
        diff = np.abs(_image(resp) - _image(solo)).max()
        assert diff <= TOLERANCE, (body, diff)


def test_batch_respects_max_batch_images(batching: Server) -> None:
    worker = batching.qds.worker
    bodies = [{"prompt": "x", "seed": i, "n": 2, "size": "32x32"} for i in range(3)]
    results = _submit_held(batching, bodies)
    assert all(r.status_code == 200 for r in results)
    recent = list(worker.batch_log)[-2:]
    assert [sum(n for _, n in b) for b in recent] == [4, 2]  # 2+2 fit in 4; the third waits


def test_incompatible_requests_never_batched(batching: Server) -> None:
    worker = batching.qds.worker
    bodies = [
        {"prompt": "a", "seed": 1, "size": "32x32"},
        {"prompt": "b", "seed": 2, "size": "16x16"},  # other size
        {"prompt": "c", "seed": 3, "size": "32x32", "num_inference_steps": 2},  # other steps
        {"prompt": "d", "seed": 4, "size": "32x32", "quant_backend": "quanto"},  # other model
        {"prompt": "e", "seed": 5, "size": "32x32", "guidance_scale": 1.0},  # other guidance
        {"prompt": "f", "seed": 6, "size": "32x32"},  # compatible with the first
    ]
    start = len(worker.batch_log)
    results = _submit_held(batching, bodies)
    assert [r.status_code for r in results] == [200] * 6
    assert results[3].json()["backend"] == "quanto"
    batches = list(worker.batch_log)[start + 1 :]  # skip the blocker
    for batch in batches:
        assert len({key for key, _ in batch}) == 1, batch
    sizes = sorted(len(b) for b in batches)
    assert sizes == [1, 1, 1, 1, 2]  # only a + f shared a call


def test_lone_request_on_idle_worker_does_not_wait_the_window(batching: Server) -> None:
    # The fixture's window is 400 ms. A request alone on an idle worker has nobody to batch
    # with, so it must start at once (the window is waited out only under concurrency).
    _post(batching, {"prompt": "warm", "size": "32x32"})  # previous call: a single job
    resp = _post(batching, {"prompt": "alone", "size": "32x32"})
    assert resp.status_code == 200
    assert resp.json()["usage"]["queue_seconds"] < 0.3
    assert resp.json()["usage"]["batch_images"] == 1
