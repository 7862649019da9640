"""Streaming against the real server (uvicorn, the engine inline so its accounting can be read):
the official openai client's stream, OpenAI's event schemas, the native progress stream,
cancellation counted in engine steps, and a reader that does not read.

No timed assertions: what ran is read from the engine's own step log and counters.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_openai_schema import assert_openai
from test_service_support import Server, running_server
from test_streaming_unit import parse_sse

from service import engine as service_engine
from service import outputs

MODEL = "qdserve/embedded-flux"
pytestmark = pytest.mark.timeout(180)


class Hold:
    """An engine-side hook (before_batch) that can stop the engine thread before the step in
    which a given prompt's job would run for the `nth` time, until released."""

    def __init__(self) -> None:
        self.prompt: str | None = None
        self.nth = 0
        self.seen = 0
        self.release: threading.Event = threading.Event()
        self.waiting = threading.Event()
        self.conn: Any = None  # the engine's end of the pipe (inline engine)

    def arm(self, prompt: str, nth: int) -> None:
        self.prompt, self.nth, self.seen = prompt, nth, 0
        self.release.clear()
        self.waiting.clear()

    def __call__(self, jobs: list[Any]) -> None:
        if self.prompt is None or not any(j.request.prompt == self.prompt for j in jobs):
            return
        self.seen += 1
        if self.seen == self.nth:
            self.waiting.set()
            assert self.release.wait(60), "the test never released the engine"
            # Let the engine go on only once what the HTTP side sent (a Cancel) is in its
            # pipe: the next loop iteration reads it before the next step.
            assert self.conn.poll(60), "nothing reached the engine's pipe"
            self.prompt = None


HOLD = Hold()


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    def setup(qds: Any) -> None:
        qds.before_batch = HOLD

    # max_batch=1: a second request cannot join a running one, so it queues behind it.
    with running_server(
        cache_dir, max_pixels=64 * 64, max_steps=64, max_images=4, max_batch=1, setup=setup
    ) as s:
        HOLD.conn = s.qds.engine.core.conn
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x")


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def test_openai_client_streams_partial_images_then_the_final_image(
    server: Server, client: OpenAI
) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="a red circle", size="32x32")
    extra = {"seed": 3, "num_inference_steps": 12}
    events = list(client.images.generate(**kw, stream=True, partial_images=2, extra_body=extra))
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials, final = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    # Previews after steps 4 and 8 of 12 (evenly spread), as the step extension says.
    assert [p.model_extra["step"] for p in partials] == [4, 8]
    assert all(_png(p.b64_json).size == (32, 32) for p in events)
    assert final.usage.input_tokens == 4 and final.usage.output_tokens == 64
    assert final.size == "32x32" and final.output_format == "png" and final.quality == "auto"
    # The streamed final image is the image the same request gets without streaming.
    plain = client.images.generate(**kw, extra_body=extra)
    assert final.b64_json == plain.data[0].b64_json
    assert partials[0].b64_json != final.b64_json


def test_stream_events_validate_against_openai_schemas(server: Server) -> None:
    body = {
        "model": MODEL,
        "prompt": "a blue square",
        "n": 2,
        "size": "32x32",
        "stream": True,
        "partial_images": 1,
        "num_inference_steps": 4,
        "seed": 9,
    }
    with server.client() as http:
        r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert [e for e, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
        "image_generation.completed",
    ]
    for name, data in events:
        assert data["type"] == name
        assert_openai(data, "ImageGenStreamEvent")
    assert [d["index"] for _, d in events] == [0, 1, 0, 1]
    assert [d["seed"] for _, d in events] == [9, 10, 9, 10]
    assert events[2][1]["usage"]["output_tokens"] == 128


def test_partial_images_zero_streams_the_final_image_only(client: OpenAI) -> None:
    events = list(
        client.images.generate(
            model=MODEL,
            prompt="a star",
            size="32x32",
            stream=True,
            extra_body={"num_inference_steps": 3},
        )
    )
    assert [e.type for e in events] == ["image_generation.completed"]


def test_native_stream_reports_steps_then_the_image(server: Server) -> None:
    body = {"prompt": "a green star", "seed": 4, "num_inference_steps": 5}
    with server.client() as http:
        r = http.post("/v1/generate", json={**body, "stream": True, "partial_images": 1})
        plain = http.post("/v1/generate", json=body)
    assert r.status_code == 200 and plain.status_code == 200
    events = parse_sse(r.content)
    progress = [(d["step"], d["total"]) for e, d in events if e == "progress"]
    steps = [s for s, _ in progress]
    # Every step once, in order, when the reader keeps up (the buffer only coalesces for a
    # reader that falls behind); always ending at N of N.
    assert steps == sorted(set(steps)) and progress[-1] == (5, 5)
    assert {t for _, t in progress} == {5}
    kinds = [e for e, _ in events]
    assert kinds.count("partial_image") == 1 and kinds[-1] == "completed"
    partial = next(d for e, d in events if e == "partial_image")
    assert (partial["partial_image_index"], partial["step"]) == (0, 2)  # round(5 / 2)
    done = events[-1][1]
    assert base64.b64decode(done["b64_json"]) == plain.content
    assert done["seed"] == 4 and done["steps"] == 5 and done["usage"]["input_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": "x", "size": "34x32"}, 400, "invalid_size"),
        ({"prompt": "x", "partial_images": 4}, 400, "invalid_value"),
        ({"prompt": "x", "num_inference_steps": 65}, 400, "invalid_value"),
    ],
)
def test_refusals_come_before_the_stream_as_plain_errors(
    server: Server, body: dict, status: int, code: str
) -> None:
    with server.client() as http:
        r = http.post("/v1/images/generations", json={**body, "stream": True})
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code


def _steps_of(stats: dict[str, Any], job_id: str) -> list[int]:
    """Indices (in the engine's step log) of the steps that ran `job_id`."""
    return [i for i, step in enumerate(stats["step_log"]) if any(j == job_id for _, j, _ in step)]


def test_disconnect_drops_the_request_at_the_next_step_and_the_queued_one_starts(
    server: Server,
) -> None:
    """A streamed request of 40 steps; its client leaves after step 3. The engine is held
    before the request's 4th step until the cancellation has reached its pipe, so the count
    is exact: the request runs that one step (in flight when it left) and no other, and the
    request queued behind it (max_batch=1) runs in the very next step."""
    qds = server.qds
    submitted: list[str] = []
    both_submitted = threading.Event()
    original_submit = qds.engine.submit

    def submit(*args: Any, **kw: Any) -> Any:
        job = original_submit(*args, **kw)
        submitted.append(job.job_id)
        if len(submitted) == 2:
            both_submitted.set()
        return job

    cancelled = threading.Event()
    original_cancel = qds.engine.cancel

    def cancel(job: Any, reason: str) -> bool:
        result = original_cancel(job, reason)
        if reason == "client_gone":
            cancelled.set()
        return result

    second: dict[str, Any] = {}

    def post_second() -> None:
        with server.client() as http:
            second["r"] = http.post(
                "/v1/generate", json={"prompt": "a blue square", "num_inference_steps": 2}
            )

    queued = threading.Thread(target=post_second)
    qds.engine.submit, qds.engine.cancel = submit, cancel  # type: ignore[method-assign]
    before = dict(qds.scheduler.cancelled)
    HOLD.arm("a red circle", nth=4)
    try:
        with server.client() as http:
            body = {"prompt": "a red circle", "num_inference_steps": 40, "stream": True}
            with http.stream("POST", "/v1/generate", json=body) as r:
                assert r.status_code == 200
                steps = (
                    json.loads(line[6:])["step"]
                    for line in r.iter_lines()
                    if line.startswith("data: ")
                )
                for step in steps:
                    if queued.ident is None:
                        # The second request, queued behind the first (max_batch=1): its
                        # Submit is ahead of the coming Cancel in the pipe.
                        queued.start()
                        assert both_submitted.wait(30)
                    if step == 3:
                        break
                # The engine is held before the 4th step: leave while it is in flight.
                assert HOLD.waiting.wait(30)
            # Leaving the `with` closes the connection mid-stream: the client is gone.
        assert cancelled.wait(30), "the server never noticed the client leaving"
    finally:
        qds.engine.submit, qds.engine.cancel = original_submit, original_cancel  # type: ignore[method-assign]
        HOLD.release.set()
        queued.join(60)
    assert second["r"].status_code == 200
    stats = qds.scheduler.stats()  # the engine is idle now: its own accounting
    first_id, second_id = submitted
    ran = _steps_of(stats, first_id)
    assert len(ran) == 4, ran  # steps 1-3, and the 4th that was in flight: 4 of 40
    # The next step the engine ran was the queued request's first.
    assert _steps_of(stats, second_id)[0] == ran[-1] + 1
    assert stats["cancelled"].get("client_gone", 0) == before.get("client_gone", 0) + 1
    assert stats["dropped_images"].get("client_gone", 0) >= 1
    with server.client() as http:
        families = text_string_to_metric_families(http.get("/metrics").text)
        counted = {
            s.labels["reason"]: s.value
            for f in families
            if f.name == "qds_cancelled"
            for s in f.samples
            if s.name == "qds_cancelled_total"
        }
    assert counted.get("client_gone", 0) >= 1


def test_a_reader_that_does_not_read_stalls_neither_the_engine_nor_others(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app called at the ASGI level with a `send` that never returns after the first
    event (what uvicorn's send does when the client's socket is full): the engine finishes the
    job, another request is served meanwhile, the stream's buffer holds one preview (the
    others dropped) and the final image, which is sent once the reader reads again."""
    buffers: list[Any] = []

    @dataclasses.dataclass
    class Recorded(outputs.StreamBuffer):
        settled: threading.Event = dataclasses.field(default_factory=threading.Event)

        def __post_init__(self) -> None:
            buffers.append(self)

        def on_done(self, future: Any) -> None:
            super().on_done(future)
            self.settled.set()

        def on_event(self, event: Any) -> None:
            self.streamed = True  # only the streamed request's handle gets events
            super().on_event(event)

    # Each request's handle gets its buffer where ServiceState.submit makes one.
    monkeypatch.setattr(service_engine, "StreamBuffer", Recorded)
    qds = server.qds
    loop = qds.engine._loop  # the server's event loop (the app runs there)
    body = json.dumps(
        {"prompt": "a red circle", "num_inference_steps": 12, "stream": True, "partial_images": 3}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/generate",
        "raw_path": b"/v1/generate",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", server.port),
        "state": {},
    }
    sent: list[dict[str, Any]] = []
    reading = threading.Event()

    async def receive() -> dict[str, Any]:
        if not sent and not getattr(receive, "done", False):
            receive.done = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.get_running_loop().create_future()  # never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            # The reader stopped reading after the first event: block like a full socket.
            await asyncio.get_running_loop().run_in_executor(None, reading.wait, 60)

    call = asyncio.run_coroutine_threadsafe(server.app(scope, receive, send), loop)
    try:
        # Meanwhile another request is served in full.
        with server.client() as http:
            other = http.post("/v1/generate", json={"prompt": "a star", "num_inference_steps": 2})
        assert other.status_code == 200
        (buf,) = [b for b in buffers if getattr(b, "streamed", False)]
        # The engine finished the stalled stream's job: its result is in the buffer.
        assert buf.settled.wait(60)
        assert buf.final is not None and buf.error is None
        # Bounded: the writer is stuck on its first event; of the three previews one waits,
        # the two older ones were dropped; progress was coalesced.
        assert len(buf.previews) == 1 and buf.previews[0].index == 2
        assert buf.previews_dropped == 2 and buf.previews_sent == 0
        assert buf.progress_coalesced >= 1
    finally:
        reading.set()
    call.result(60)
    events = parse_sse(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    kinds = [e for e, _ in events]
    assert kinds.count("partial_image") == 1 and kinds[-1] == "completed"
    assert next(d for e, d in events if e == "partial_image")["partial_image_index"] == 2
    assert events[-1][1]["steps"] == 12
