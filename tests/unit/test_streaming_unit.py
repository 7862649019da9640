"""The output path on its own, against a stub job (no engine, no model): preview step choice,
the request handle's bounded buffer, the SSE events rendered from the handle (validated
against OpenAI's schemas), errors and deadlines in the stream, and withdrawal when the writer
is cancelled."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from test_openai_schema import assert_openai

from engine.failures import OutOfMemory
from engine.keys import ModelKey
from engine.messages import Preview, Progress
from pipelines.generate import GenerationRequest
from pipelines.seeds import image_seeds
from pipelines.token_usage import TokenUsage
from service.outputs import RequestHandle, StreamBuffer
from service.processor import preview_steps
from service.streaming import event_stream

KEY = ModelKey("qdserve/embedded-flux", "none", None, "float32")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("steps", "k", "expected"),
    [
        (12, 2, (4, 8)),
        (12, 3, (3, 6, 9)),
        (12, 1, (6,)),
        (12, 0, ()),
        (4, 2, (1, 3)),
        (4, 3, (1, 2, 3)),
        (2, 3, (1,)),  # too few steps: fewer partials, the final image still comes
        (1, 2, ()),
        (50, 9, (12, 25, 38)),  # clamped to OpenAI's 3
    ],
)
def test_preview_steps_are_evenly_spread_inside_the_run(
    steps: int, k: int, expected: tuple
) -> None:
    assert preview_steps(steps, k) == expected


# -- a stub engine ---------------------------------------------------------------------------
@dataclass
class StubEngine:
    cancelled: list[tuple[str, str]] = field(default_factory=list)

    def cancel(self, job: Any, reason: str) -> bool:
        self.cancelled.append((job.job_id, reason))
        if not job.future.done():
            job.future.cancel()
        return False


class StubHandle(RequestHandle):
    """A handle whose "engine" is a bare future and whose encoding is canned."""

    async def encode(self, finished: Any) -> Any:
        req = self.spec.request
        self.outcome = SimpleNamespace(
            key=KEY,
            images=[b"final-%d" % i for i in range(req.num_images)],
            seeds=self.seeds,
            width=req.width,
            height=req.height,
            steps=req.num_inference_steps,
            queue_seconds=0.0,
            inference_seconds=0.1,
            encode_seconds=0.0,
            batch_images=req.num_images,
            usage=TokenUsage(4, 0, 64 * req.num_images),
        )
        return self.outcome


def _handle(n: int = 1, steps: int = 12, deadline_s: float = 30.0) -> tuple[StubEngine, Any]:
    loop = asyncio.get_running_loop()
    req = GenerationRequest(
        "a red circle", num_inference_steps=steps, seed=5, width=32, height=32, num_images=n
    )
    spec = SimpleNamespace(
        key=KEY,
        request=req,
        output_format="png",
        output_compression=None,
        seeds=image_seeds(5, n),
        deadline=time.monotonic() + deadline_s,
    )
    engine = StubEngine()
    job = SimpleNamespace(job_id="1", future=loop.create_future(), started=True)
    return engine, StubHandle(spec, job, engine.cancel, request_timeout=1.0)  # type: ignore[arg-type]


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(n)]


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE body (one data line per event, as qdserve writes)."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


async def _collect(gen: Any) -> bytes:
    return b"".join([chunk async for chunk in gen])


# -- the buffer ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_buffer_stays_bounded_when_nobody_reads_and_keeps_the_final() -> None:
    buf = StreamBuffer()
    fut = asyncio.get_running_loop().create_future()
    fut.add_done_callback(buf.on_done)
    for step in range(1, 1001):
        buf.on_event(Progress("1", step, 1000))
        if step % 10 == 0:
            buf.on_event(Preview("1", step // 10, step, 1000, _images(2)))
    fut.set_result("finished")
    await asyncio.sleep(0)  # the future's callbacks run on the next loop turn
    # At most one progress, one preview and the final are held, however much arrived.
    assert buf.progress is not None and buf.progress.step == 1000
    assert len(buf.previews) == 1 and buf.previews[0].index == 100
    assert buf.final == "finished"
    assert buf.previews_dropped == 99 and buf.progress_coalesced == 999
    # The reader gets the latest of each, then the final.
    first = await buf.next(1.0)
    second = await buf.next(1.0)
    assert (first.step, second.index) == (1000, 100)
    assert await buf.next(1.0) == "finished"


@pytest.mark.anyio
async def test_buffer_next_times_out_with_nothing() -> None:
    with pytest.raises(TimeoutError):
        await StreamBuffer().next(0.01)


# -- the events ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "union"), [("generation", "ImageGenStreamEvent"), ("edit", "ImageEditStreamEvent")]
)
@pytest.mark.anyio
async def test_openai_stream_events_validate_and_come_in_order(flavor: str, union: str) -> None:
    engine, handle = _handle(n=2)
    buf, sub = handle.buffer, handle
    gen = event_stream(handle, flavor, "rid", KEY.model)  # type: ignore[arg-type]
    for index, step in enumerate(preview_steps(12, 2)):
        buf.on_event(Progress("1", step, 12))
        buf.on_event(Preview("1", index, step, 12, _images(2)))
    sub.job.future.set_result("finished")
    events = parse_sse(await _collect(gen))
    kinds = [e for e, _ in events]
    prefix = "image_generation" if flavor == "generation" else "image_edit"
    # Progress is native-only; the second preview replaced the first while nobody read (the
    # buffer holds one), so one partial per image, then one completed per image.
    assert kinds == [f"{prefix}.partial_image"] * 2 + [f"{prefix}.completed"] * 2
    for name, data in events:
        assert data["type"] == name
        assert_openai(data, union)
    partial, completed = events[0][1], events[2][1]
    assert (
        partial["partial_image_index"] == 1 and partial["step"] == 8 and partial["size"] == "32x32"
    )
    assert [e[1]["seed"] for e in events] == [5, 6, 5, 6]
    assert [e[1]["index"] for e in events] == [0, 1, 0, 1]
    assert completed["usage"]["output_tokens"] == 128
    assert engine.cancelled == []


@pytest.mark.anyio
async def test_partials_read_promptly_are_all_sent() -> None:
    _engine, handle = _handle()
    buf, sub = handle.buffer, handle
    gen = event_stream(handle, "generation", "rid", KEY.model)
    got = []
    for index, step in enumerate(preview_steps(12, 3)):
        buf.on_event(Preview("1", index, step, 12, _images(1)))
        got.append(parse_sse(await gen.__anext__())[0][1]["partial_image_index"])
    sub.job.future.set_result("finished")
    rest = parse_sse(await _collect(gen))
    assert got == [0, 1, 2] and [e for e, _ in rest] == ["image_generation.completed"]


@pytest.mark.anyio
async def test_native_stream_reports_every_step_then_the_image() -> None:
    _engine, handle = _handle(steps=4)
    buf, sub = handle.buffer, handle
    gen = event_stream(handle, "native", "rid", KEY.model)
    steps = []
    for step in (1, 2, 3):
        buf.on_event(Progress("1", step, 4))
        event, data = parse_sse(await gen.__anext__())[0]
        assert event == "progress"
        steps.append((data["step"], data["total"]))
    sub.job.future.set_result("finished")
    rest = parse_sse(await _collect(gen))
    # The engine sends progress for running jobs only; the last step is reported with the result.
    assert steps + [(d["step"], d["total"]) for e, d in rest if e == "progress"] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    assert (
        rest[-1][0] == "completed"
        and rest[-1][1]["seed"] == 5
        and rest[-1][1]["usage"]["input_tokens"] == 4
    )


@pytest.mark.anyio
async def test_engine_error_becomes_an_error_event_the_openai_client_raises_on() -> None:
    _engine, handle = _handle()
    _buf, sub = handle.buffer, handle
    gen = event_stream(handle, "generation", "rid-1", KEY.model)
    sub.job.future.set_exception(OutOfMemory("out of memory while generating"))
    events = parse_sse(await _collect(gen))
    assert events == [
        (
            "error",
            {
                "error": {
                    "message": "out of memory while generating",
                    "type": "server_error",
                    "param": None,
                    "code": "out_of_memory",
                    "request_id": "rid-1",
                }
            },
        )
    ]


@pytest.mark.anyio
async def test_internal_error_shows_no_detail() -> None:
    _engine, handle = _handle()
    _buf, sub = handle.buffer, handle
    gen = event_stream(handle, "native", "rid-2", KEY.model)
    sub.job.future.set_exception(RuntimeError("secret traceback text"))
    ((event, data),) = parse_sse(await _collect(gen))
    assert event == "error" and data["error"]["code"] == "internal_error"
    assert "secret" not in data["error"]["message"] and "rid-2" in data["error"]["message"]


@pytest.mark.anyio
async def test_deadline_withdraws_the_job_and_says_so() -> None:
    engine, handle = _handle(deadline_s=0.05)
    events = parse_sse(await _collect(event_stream(handle, "generation", "rid", KEY.model)))
    assert [e for e, _ in events] == ["error"]
    assert events[0][1]["error"] == {
        "message": "request timed out after 1s (QDS_REQUEST_TIMEOUT) while running",
        "type": "server_error",
        "param": None,
        "code": "timeout",
        "request_id": "rid",
    }
    assert engine.cancelled == [("1", "timeout")]


@pytest.mark.anyio
async def test_cancelled_writer_withdraws_the_job_as_client_gone() -> None:
    """What Starlette does when the client disconnects: cancel the task running the writer."""
    engine, handle = _handle()
    buf, _sub = handle.buffer, handle
    gen = event_stream(handle, "native", "rid", KEY.model)
    buf.on_event(Progress("1", 1, 12))
    await gen.__anext__()
    waiting = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert engine.cancelled == [("1", "client_gone")]
