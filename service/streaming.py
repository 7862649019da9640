"""Server-sent events for the generation endpoints: OpenAI's image stream, and the native
progress stream.

    engine (its own process)           HTTP process (event loop)                client
    ------------------------           -------------------------                ------
    step k done  -> Progress(k, N) --> EngineClient reader -> StreamBuffer --> SSE writer
    preview step -> Preview(images)                          (bounded)       (one per stream)
    last step    -> Finished  ------------------------------>  final  ------> completed event

Backpressure: the engine never waits for the HTTP side, and the HTTP side never waits for a
client in the engine's path. Events reach a per-stream `StreamBuffer` from the event loop
without awaiting; the buffer keeps at most the latest progress, `MAX_PENDING_PREVIEWS`
previews not yet sent (a newer one replaces the oldest), and the final result, which is never
dropped. Only the writer coroutine of that stream awaits the client (uvicorn's `send` waits
on the socket's flow control), so a reader that does not read holds that coroutine and a
bounded amount of memory, never the engine or other requests. Previews are PNG/JPEG/WebP
encoded only when the writer takes them, so a dropped preview costs no encoding.

Partial images are previews of the latents at evenly spread step boundaries
(`preview_steps`): the engine renders the predicted clean latents x0 = x - sigma * v
(`pipelines.stepping.StepBatch.latents_preview`) with a linear latent -> RGB map fitted to
the served VAE (`pipelines.previews`; real VAE decodes while that fit learns), no denoiser
forward (docs/benchmarks/streaming.md has the measured costs). Pipelines that run whole calls
(no step loop) have no latents between steps: their streams carry the final image only.

Cancellation: Starlette cancels the writer when the client disconnects (it listens for
`http.disconnect` while streaming); the writer then withdraws the job (`client_gone`) and the
engine drops it at the next step boundary. A deadline (QDS_REQUEST_TIMEOUT) withdraws it
(`timeout`) and ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from engine.failures import Failure
from service.errors import to_api_error
from service.imaging import encode_all
from service.protocol import (
    EDIT_EVENTS,
    GENERATION_EVENTS,
    MAX_PARTIAL_IMAGES,
    PartialImageEvent,
    ProgressEvent,
    error_body,
)
from service.responses import b64, native_completed, timings, usage

if TYPE_CHECKING:
    from fastapi import Request
    from PIL.Image import Image

    from service.engine import Outcome, ServiceState, Submitted
    from service.resolve import ImageParams

log = logging.getLogger("qdserve.streaming")

# Previews waiting for a slow writer; a newer one replaces the oldest beyond this.
MAX_PENDING_PREVIEWS = 1
# Previews of at most this many pixels (all images) are encoded on the loop (as results are,
# service.engine.INLINE_ENCODE_PIXELS); larger ones in a thread.
INLINE_ENCODE_PIXELS = 128 * 128
HEADERS = {
    "Cache-Control": "no-cache",
    # Tell nginx-style proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The steps after which to preview: `partial_images` evenly spread strictly inside the
    run (after step round(N * (i + 1) / (k + 1)), i = 0..k-1), fewer when N is too small to
    give distinct steps (OpenAI allows the final image to come before every partial)."""
    k = max(0, min(int(partial_images), MAX_PARTIAL_IMAGES))
    n = int(total_steps)
    steps = {round(n * (i + 1) / (k + 1)) for i in range(k)}
    return tuple(sorted(s for s in steps if 1 <= s < n))


# -- what the engine sends about a running job (duck-typed: engine.messages) ---------
@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    index: int  # which of the request's partial images (0-based)
    step: int
    total: int
    images: list[Image]


@dataclass
class StreamBuffer:
    """The bounded buffer between the engine's events (pushed on the loop, never awaiting)
    and one stream's writer. Holds at most: the latest progress, MAX_PENDING_PREVIEWS
    previews, the final outcome or error."""

    max_previews: int = MAX_PENDING_PREVIEWS
    progress: Progress | None = None
    previews: collections.deque[Preview] = field(default_factory=collections.deque)
    final: Any = None  # the engine's Finished event
    error: BaseException | None = None
    # Accounting (the access log carries it): what a slow reader made the buffer skip.
    progress_coalesced: int = 0
    previews_dropped: int = 0
    previews_sent: int = 0
    outcome: Outcome | None = None  # set by the writer once encoded (for the access log)
    client_gone: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    # -- producer side (event loop; never awaits) -----------------------------------------
    def on_event(self, event: Any) -> None:
        """An engine event for this job: `Progress(step, total)` or `Preview(...)`."""
        if hasattr(event, "images"):
            if len(self.previews) >= self.max_previews:
                self.previews.popleft()
                self.previews_dropped += 1
            self.previews.append(Preview(event.index, event.step, event.total, event.images))
        else:
            if self.progress is not None:
                self.progress_coalesced += 1
            self.progress = Progress(event.step, event.total)
        self._wake.set()

    def on_done(self, future: asyncio.Future[Any]) -> None:
        """The job's future settled: the final result, or its error (never dropped)."""
        if future.cancelled():
            self.error = asyncio.CancelledError()
        elif future.exception() is not None:
            self.error = future.exception()
        else:
            self.final = future.result()
        self._wake.set()

    # -- consumer side (the stream's writer) ----------------------------------------------
    async def next(self, timeout: float) -> Progress | Preview | BaseException | Any:
        """The next thing to send, oldest kind first: progress, previews, then the final
        result or error. Raises TimeoutError after `timeout` seconds with nothing."""
        while True:
            if self.progress is not None:
                item, self.progress = self.progress, None
                return item
            if self.previews:
                self.previews_sent += 1
                return self.previews.popleft()
            if self.error is not None:
                return self.error
            if self.final is not None:
                return self.final
            self._wake.clear()
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, timeout))

    def stats(self) -> dict[str, int]:
        return {
            "stream_previews_sent": self.previews_sent,
            "stream_previews_dropped": self.previews_dropped,
            "stream_progress_coalesced": self.progress_coalesced,
        }


def sse(event: str, body: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event (FastAPI's encoder): `event: <name>` and one JSON `data:` line;
    None fields are left out, as in the JSON responses."""
    data = (
        body.model_dump_json(exclude_none=True)
        if isinstance(body, BaseModel)
        else _json_dumps(body)
    )
    return format_sse_event(data_str=data, event=event)


def _json_dumps(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body, separators=(",", ":"))


def error_event(exc: BaseException, request_id: str | None) -> bytes:
    """An error after the stream has started: OpenAI's error shape in an `error` event (the
    openai client raises APIError on it). Internal errors carry no detail, only the id."""
    if isinstance(exc, Failure):
        api = to_api_error(exc)
        body = error_body(
            api.message, type=api.type, param=api.param, code=api.code, request_id=request_id
        )
    else:
        log.error("stream failed (request id %s): %r", request_id, exc)
        body = error_body(
            f"internal error; quote request id {request_id} when reporting it",
            type="server_error",
            code="internal_error",
            request_id=request_id,
        )
    return sse("error", body)


async def _encode_preview(preview: Preview, fmt: str, compression: int | None) -> list[bytes]:
    pixels = sum(img.width * img.height for img in preview.images)
    if pixels <= INLINE_ENCODE_PIXELS:
        return encode_all(preview.images, fmt, compression)
    return await asyncio.to_thread(encode_all, preview.images, fmt, compression)


Flavor = Literal["generation", "edit", "native"]


async def event_stream(
    qds: ServiceState, sub: Submitted, buffer: StreamBuffer, flavor: Flavor, request_id: str | None
) -> AsyncIterator[bytes]:
    """The SSE body of one streamed request (see the module docstring)."""
    params = sub.params
    fmt, compression = params.output_format, params.output_compression
    size = f"{sub.request.width}x{sub.request.height}"
    seeds = sub.seeds
    last_step = 0
    done = False
    try:
        while True:
            try:
                item = await buffer.next(sub.deadline - time.monotonic())
            except TimeoutError:
                qds.engine.cancel(sub.job, "timeout")
                done = True
                yield error_event(qds.timeout_error(sub), request_id)
                return
            if isinstance(item, Progress):
                if flavor == "native":
                    last_step = item.step
                    yield sse("progress", ProgressEvent(step=item.step, total=item.total))
            elif isinstance(item, Preview):
                images = await _encode_preview(item, fmt, compression)
                for i, data in enumerate(images):
                    yield _partial(flavor, item, i, data, seeds[i], size, fmt)
            elif isinstance(item, BaseException):
                done = True
                yield error_event(item, request_id)
                return
            else:
                done = True
                out = buffer.outcome = await qds.outcome(sub, item)
                if flavor == "native" and last_step < out.steps:
                    # The engine reports progress for jobs still running; the last step is
                    # known done when the result arrives (out.steps: the steps that ran, fewer
                    # than asked for an edit whose strength skips the start).
                    yield sse("progress", ProgressEvent(step=out.steps, total=out.steps))
                for chunk in _completed(qds, flavor, out, size, fmt):
                    yield chunk
                return
    finally:
        if not done:
            # The client left (Starlette cancelled this writer) or the server is stopping.
            buffer.client_gone = True
            qds.engine.cancel(sub.job, "client_gone")
            log.info("stream client left; job %s withdrawn", sub.job.job_id)


def _partial(
    flavor: Flavor, item: Preview, i: int, data: bytes, seed: int, size: str, fmt: str
) -> bytes:
    if flavor == "native":
        event: BaseModel = PartialImageEvent(
            partial_image_index=item.index,
            step=item.step,
            total=item.total,
            b64_json=b64(data),
            output_format=fmt,  # type: ignore[arg-type]
        )
        return sse("partial_image", event)
    cls = (GENERATION_EVENTS if flavor == "generation" else EDIT_EVENTS)[0]
    event = cls(
        b64_json=b64(data),
        created_at=int(time.time()),
        size=size,
        output_format=fmt,
        partial_image_index=item.index,
        index=i,
        seed=seed,
        step=item.step,
        total_steps=item.total,
    )
    return sse(event.type, event)  # type: ignore[attr-defined]


def _completed(qds: ServiceState, flavor: Flavor, out: Outcome, size: str, fmt: str) -> list[bytes]:
    model_id = qds.public_id(out.key)
    if flavor == "native":
        return [sse("completed", native_completed(out, fmt, model_id))]
    u = usage(out)
    if u is None:
        raise RuntimeError("the engine returned no token usage for a streamed request")
    cls = (GENERATION_EVENTS if flavor == "generation" else EDIT_EVENTS)[1]
    t = timings(out)
    created = int(time.time())
    chunks = []
    for i, (data, seed) in enumerate(zip(out.images, out.seeds, strict=True)):
        event = cls(
            b64_json=b64(data),
            created_at=created,
            size=size,
            output_format=fmt,
            index=i,
            seed=seed,
            usage=u,
            model=model_id,
            backend=out.key.backend,
            quant_type=out.key.quant_type,
            timings=t,
        )
        chunks.append(sse(event.type, event))  # type: ignore[attr-defined]
    return chunks


async def stream_response(
    qds: ServiceState,
    request: Request,
    params: ImageParams,
    flavor: Flavor,
    partial_images: int,
    *,
    log_extra: dict[str, Any] | None = None,
) -> StreamingResponse:
    """Admit the request (errors before the first byte are ordinary HTTP errors), then answer
    with its event stream."""
    buffer = StreamBuffer()
    sub = await qds.submit(request, params, on_event=buffer.on_event, partial_images=partial_images)
    sub.job.future.add_done_callback(buffer.on_done)
    request_id = getattr(request.state, "request_id", None)

    async def body() -> AsyncIterator[bytes]:
        with qds.metrics.inflight.track_inprogress():
            try:
                async for chunk in event_stream(qds, sub, buffer, flavor, request_id):
                    yield chunk
            finally:
                # The access line is written after the last byte (or the disconnect).
                out = buffer.outcome
                request.state.log_extra = {
                    **(out.log_fields() if out is not None else {}),
                    **(log_extra or {}),
                    **buffer.stats(),
                    "stream": flavor,
                    "client_gone": buffer.client_gone,
                }

    return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)
