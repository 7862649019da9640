"""The faults a production operator meets (issue 27), against real servers and engines: a
stopped (SIGSTOP) engine and a hung model load, shutdown with requests in every stage, a
hostile upload burst, and one API key flooding the queue. The full run with figures is
`tools/fault_suite.py` (docs/reliability.md); these are its quick, deterministic checks.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from test_service_support import Server, running_server

IMG = "/v1/images/generations"
EDIT = "/v1/images/edits"
pytestmark = pytest.mark.timeout(300)


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)
    return value


def _readyz(server: Server) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=5)


# -- a hung engine ---------------------------------------------------------------------------
def hanging_load(settings: Any) -> Any:
    """The engine's loader (pickled by reference into the engine process): the quanto
    variant's load never returns (a hung download or a deadlock); others load normally."""
    from pipelines.loader import load_pipeline

    if settings.quant_backend == "quanto":
        while True:
            time.sleep(1)
    return load_pipeline(settings)


STALL_S = 3.0
LOAD_S = 4.0


@pytest.fixture(scope="module")
def watched(cache_dir: Path) -> Iterator[Server]:
    def setup(qds: Any) -> None:
        qds.load = hanging_load

    with running_server(
        cache_dir,
        engine="process",
        setup=setup,
        engine_stall_timeout=STALL_S,
        # Off while the default model loads (its imports alone take 10-30 s on a busy
        # 2-core machine); the load test sets it once the server is ready.
        model_load_timeout=0,
        request_timeout=30,
        allow_on_demand_load=True,
    ) as s:
        yield s


def test_the_whole_service_paused_is_not_a_stall(watched: Server) -> None:
    """The HTTP process and the engine stopped together for longer than the stall timeout
    (SIGSTOP of the process group, a paused VM; the peer benchmark pauses the server it is not
    measuring): on resume the engine keeps serving, not killed as hung. The HTTP side's pause
    is its event loop blocked here (its thread in this process), the engine's a SIGSTOP."""
    qds = watched.qds
    pid = qds.engine.pid
    assert pid is not None
    restarts = qds.engine.restarts
    os.kill(pid, signal.SIGSTOP)
    try:
        qds.engine._loop_().call_soon_threadsafe(time.sleep, STALL_S + 3)
        time.sleep(STALL_S + 2)
    finally:
        os.kill(pid, signal.SIGCONT)  # before the loop runs again: both resume together
    time.sleep(STALL_S)  # the watchdog's next looks
    assert qds.engine.pid == pid and qds.engine.restarts == restarts
    assert _readyz(watched).status_code == 200
    with watched.client() as c:
        assert c.post(IMG, json={"prompt": "resumed", "size": "32x32"}).status_code == 200
        assert "qds_engine_stalls_total 0.0" in c.get("/metrics").text


def test_a_stopped_engine_is_detected_answered_503_and_restarted(watched: Server) -> None:
    """SIGSTOP with a request queued: readiness 503 and the request a retryable 503 within
    the stall timeout (not after QDS_REQUEST_TIMEOUT), the engine killed and restarted, a
    metric counted. Today's code: /readyz stays 200 and the request waits for its 504."""
    qds = watched.qds
    old_pid = qds.engine.pid
    assert old_pid is not None
    restarts = qds.engine.restarts
    os.kill(old_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(
                httpx.post,
                watched.url + IMG,
                json={"prompt": "x", "size": "32x32"},
                timeout=60,
            )
            wait_for(lambda: _readyz(watched).status_code == 503, 20, "readiness 503")
            detected = time.monotonic() - stopped
            r = queued.result(30)
            answered = time.monotonic() - stopped
    finally:
        # The watchdog should have killed and reaped it already: then there is nothing to resume.
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGCONT)
    assert detected < STALL_S + 3, detected
    assert answered < STALL_S + 3, answered
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "engine_unavailable"
    assert "no sign of life" in err["message"] and "QDS_ENGINE_STALL_TIMEOUT=3" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    body = _readyz(watched).json()
    assert body["status"] == "not_ready"
    wait_for(lambda: _readyz(watched).status_code == 200, 120, "ready again")
    assert qds.engine.pid != old_pid and qds.engine.restarts == restarts + 1
    with watched.client() as c:
        assert c.post(IMG, json={"prompt": "after", "size": "32x32"}).status_code == 200
        assert "qds_engine_stalls_total 1.0" in c.get("/metrics").text


def test_a_hung_model_load_times_out_and_restarts_the_engine(watched: Server) -> None:
    """A load that never returns would block every later load (they run one at a time):
    QDS_MODEL_LOAD_TIMEOUT answers its waiters 503 and restarts the engine."""
    qds = watched.qds
    old_pid = qds.engine.pid
    settings = qds.engine.config.settings  # what the watchdog reads
    settings.model_load_timeout = LOAD_S
    start = time.monotonic()
    try:
        with watched.client(timeout=60) as c:
            r = c.post(IMG, json={"prompt": "x", "size": "32x32", "quant_backend": "quanto"})
    finally:
        settings.model_load_timeout = 0  # the restarted engine's default load: unbounded
    assert r.status_code == 503, r.text
    assert time.monotonic() - start < LOAD_S + 5
    err = r.json()["error"]
    assert err["code"] == "engine_unavailable" and "QDS_MODEL_LOAD_TIMEOUT=4" in err["message"]
    # A new engine is on its way (the previous test saw one serve again after a restart).
    wait_for(lambda: qds.engine.pid != old_pid, 60, "a new engine process")
    assert _readyz(watched).status_code == 503


# -- shutdown in every stage -----------------------------------------------------------------
class Gate:
    """Holds the engine inside its first step until opened (before_batch hook)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.arrived = 0

    def __call__(self, _jobs: list) -> None:
        self.arrived += 1
        if self.arrived == 1:
            self.event.wait(30)


def _png(size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = "qdsfaultboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _raw_response(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


LOAD_RELEASE = threading.Event()


def slow_quanto_load(settings: Any) -> Any:
    """The inline engine's loader: the quanto load waits until released, then fails (so its
    thread is gone before the interpreter exits: torch aborts the exit otherwise)."""
    from pipelines.loader import load_pipeline

    if settings.quant_backend == "quanto":
        LOAD_RELEASE.wait(60)
        raise RuntimeError("released by the test")
    return load_pipeline(settings)


def test_shutdown_answers_every_stage_with_an_openai_503(cache_dir: Path) -> None:
    """QDS_SHUTDOWN_TIMEOUT=0 with requests waiting on the engine, on a model load, in a
    stream, and still uploading: each gets an OpenAI-shaped 503 `shutting_down` (the stream
    an `error` event), none uvicorn's plain-text 500; the whole shutdown, engine stop
    included, within the stated margin."""
    from service.settings import SHUTDOWN_MARGIN_S

    gate = Gate()

    def setup(qds: Any) -> None:
        qds.before_batch = gate
        qds.load = slow_quanto_load

    with running_server(
        cache_dir,
        setup=setup,
        shutdown_timeout=0,
        max_batch=1,
        allow_on_demand_load=True,
    ) as server:
        pool = ThreadPoolExecutor(4)
        body = {"prompt": "x", "size": "32x32"}
        running = pool.submit(httpx.post, server.url + IMG, json=body, timeout=60)
        wait_for(lambda: gate.arrived == 1, 30, "a request in its step")
        loading = pool.submit(
            httpx.post, server.url + IMG, json={**body, "quant_backend": "quanto"}, timeout=60
        )
        wait_for(lambda: _quanto_loading(server), 30, "a model load under way")

        def stream() -> bytes:
            with httpx.stream(
                "POST", server.url + IMG, json={**body, "stream": True}, timeout=60
            ) as r:
                return b"".join(r.iter_bytes())

        streamed = pool.submit(stream)
        wait_for(lambda: server.qds.queue_depth() == 1, 30, "the stream queued")
        # An edit whose body is half sent.
        upload, ctype = _multipart({"prompt": "x", "size": "32x32"}, _png((256, 256)))
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            f"POST {EDIT} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(upload)}\r\n\r\n".encode()
            + upload[: len(upload) // 2]
        )
        time.sleep(0.3)  # the server is reading it
        stop = time.monotonic()
        server.server.should_exit = True  # what SIGTERM does
        answers = [running.result(30), loading.result(30)]
        raw = _raw_response(sock)
        sse = streamed.result(30)
        server.thread.join(30)
        took = time.monotonic() - stop
        gate.event.set()
        LOAD_RELEASE.set()
        # The inline engine (held in its step until now) and the load thread finish, so no
        # torch work is left running when the interpreter exits (torch aborts the exit).
        wait_for(
            lambda: (
                not any(
                    t.name == "qds-engine" or t.name.startswith("qds-load-")
                    for t in threading.enumerate()
                )
            ),
            60,
            "the engine and load threads gone",
        )
        pool.shutdown()
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down"
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), raw[:300]
    assert b'"code": "shutting_down"' in payload or b'"code":"shutting_down"' in payload
    assert b"event: error" in sse and b"shutting_down" in sse, sse[-500:]
    assert took < 0 + SHUTDOWN_MARGIN_S, took


def _quanto_loading(server: Server) -> bool:
    return bool(server.qds.engine._load_waiters)  # a request waits on a model load


# -- hostile uploads -------------------------------------------------------------------------
def test_upload_burst_is_admitted_before_decoding_bounded_and_downscaled(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4096x4096 edit uploads: a request the queue refuses costs no decode; at most
    QDS_MAX_CONCURRENT_DECODES decode at once; the image reaches the engine at the output
    size, not at full resolution."""
    from service.routes import edits

    real = edits.decode_edit_images
    active = [0, 0]  # now, most
    lock = threading.Lock()
    decoded: list[int] = []

    def counting(*args: Any, **kw: Any) -> Any:
        with lock:
            active[0] += 1
            active[1] = max(active)
            decoded.append(1)
        try:
            time.sleep(0.2)
            return real(*args, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(edits, "decode_edit_images", counting)
    sizes: list[tuple[int, int]] = []
    gate = Gate()

    def record(jobs: list) -> None:
        sizes.extend(j.request.image.size for j in jobs)
        gate(jobs)

    def setup(qds: Any) -> None:
        qds.before_batch = record

    big = _png((4096, 4096))
    upload, ctype = _multipart({"prompt": "x", "size": "32x32", "strength": "1.0"}, big)

    def post() -> httpx.Response:
        return httpx.post(
            server.url + EDIT, content=upload, headers={"Content-Type": ctype}, timeout=120
        )

    with (
        running_server(
            cache_dir, setup=setup, max_queue=4, max_batch=1, max_concurrent_decodes=2
        ) as server,
        ThreadPoolExecutor(8) as pool,
    ):
        first = pool.submit(post)
        wait_for(
            lambda: gate.arrived == 1 and server.qds.queue_depth() == 0,
            60,
            "the first edit in its step, seen started by the HTTP side",
        )
        rest = [pool.submit(post) for _ in range(7)]
        wait_for(lambda: server.qds.queue_depth() == 4, 60, "the queue full")
        # The admitted ones (the running one and four queued) finish decoding first: two at a
        # time, 0.2 s each plus a 4096x4096 decode, which on a busy machine outlasted a fixed
        # 0.5 s wait and counted as the refused request's decode.
        wait_for(lambda: len(decoded) >= 5 and active[0] == 0, 60, "the admitted decoded")
        before = len(decoded)
        refused = post()
        assert refused.status_code == 429, refused.text
        assert len(decoded) == before  # refused before its image was decoded
        gate.event.set()
        answers = [first.result(120)] + [f.result(120) for f in rest]
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 5, statuses
    assert active[1] <= 2, active
    assert sizes and set(sizes) == {(32, 32)}, sizes


# -- one key flooding the queue --------------------------------------------------------------
def test_a_flooding_key_does_not_starve_a_light_one(cache_dir: Path) -> None:
    """One key keeps more requests open than the queue holds, another sends one at a time:
    the light key gets no 429 and at most half the heavy key's p99; the heavy key gets the
    429s. Today both wait in one FIFO (and the light key is refused whenever it is full)."""
    heavy_h = {"Authorization": "Bearer heavy-key"}
    light_h = {"Authorization": "Bearer light-key"}
    body = {"prompt": "x", "size": "32x32", "num_inference_steps": 4}
    with running_server(
        cache_dir, api_keys="heavy-key,light-key", max_queue=8, max_batch=1
    ) as server:
        stop = threading.Event()
        heavy: list[tuple[int, float]] = []
        light: list[tuple[int, float]] = []

        def flood() -> None:
            with server.client(timeout=120) as c:
                while not stop.is_set():
                    t = time.monotonic()
                    r = c.post(IMG, json=body, headers=heavy_h)
                    heavy.append((r.status_code, time.monotonic() - t))
                    if r.status_code == 429:
                        time.sleep(0.05)

        threads = [threading.Thread(target=flood) for _ in range(12)]
        for t in threads:
            t.start()
        wait_for(lambda: server.qds.queue_depth() >= 5, 30, "the heavy key's queue")
        with server.client(timeout=120) as c:
            end = time.monotonic() + 12
            while time.monotonic() < end or len(light) < 8:
                t = time.monotonic()
                r = c.post(IMG, json=body, headers=light_h)
                light.append((r.status_code, time.monotonic() - t))
        stop.set()
        for t in threads:
            t.join(120)

    def p99(xs: list[tuple[int, float]]) -> float:
        ok = sorted(s for code, s in xs if code == 200)
        return ok[min(len(ok) - 1, int(0.99 * len(ok)))]

    print(f"light p99 {p99(light):.2f} s ({len(light)}), heavy p99 {p99(heavy):.2f} s")
    light_codes = [code for code, _ in light]
    heavy_codes = [code for code, _ in heavy]
    assert light_codes.count(429) == 0 and set(light_codes) == {200}, light_codes
    assert heavy_codes.count(429) > 0 and heavy_codes.count(200) > 0
    assert p99(light) <= 0.5 * p99(heavy), (
        p99(light),
        p99(heavy),
        statistics.median(s for _, s in light),
    )
