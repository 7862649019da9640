"""Server-sent events for the generation endpoints, rendered from a request's handle
(`service.outputs.RequestHandle`): OpenAI's image stream, and the native progress stream.

    engine (its own process)           HTTP process (event loop)                    client
    ------------------------           -------------------------                    ------
    step k done  -> Progress(k, N) --> EngineClient reader -> RequestHandle  --> SSE writer
    preview step -> Preview(images)                          (bounded buffer)  (one per stream)
    last step    -> Finished  ------------------------------>  final  ------> completed event

Backpressure (the buffer is the handle's; see `service.outputs`): only the writer coroutine
of a stream awaits the client (uvicorn's `send` waits on the socket's flow control), so a
reader that does not read holds that coroutine and a bounded amount of memory, never the
engine or other requests. Previews are PNG/JPEG/WebP encoded only when the writer takes them,
so a dropped preview costs no encoding.

Partial images are previews of the latents at evenly spread step boundaries
(`preview_steps`): the engine renders the predicted clean latents x0 = x - sigma * v
(`pipelines.stepping.StepBatch.latents_preview`) with a linear latent -> RGB map fitted to
the served VAE (`pipelines.previews`; real VAE decodes while that fit learns), no denoiser
forward (docs/benchmarks/streaming.md has the measured costs). Pipelines that run whole calls
(no step loop) have no latents between steps: their streams carry the final image only.

Cancellation: Starlette cancels the writer when the client disconnects (it listens for
`http.disconnect` while streaming); the writer then tells the handle, which withdraws the job
(`client_gone`) and the engine drops it at the next step boundary. At the deadline
(QDS_REQUEST_TIMEOUT) the handle withdraws it (`timeout`) and the stream ends with an error
event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from engine.failures import Failure
from engine.messages import Preview, Progress
from service.auth import client_key
from service.errors import to_api_error
from service.outputs import Outcome, RequestHandle
from service.protocol import (
    EDIT_EVENTS,
    GENERATION_EVENTS,
    PartialImageEvent,
    ProgressEvent,
    error_body,
)
from service.responses import b64, native_completed, timings, usage

if TYPE_CHECKING:
    from fastapi import Request

    from service.engine import ServiceState
    from service.processor import ImageParams

log = logging.getLogger("qdserve.streaming")

HEADERS = {
    "Cache-Control": "no-cache",
    # Tell nginx-style proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
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


Flavor = Literal["generation", "edit", "native"]


async def event_stream(
    handle: RequestHandle, flavor: Flavor, request_id: str | None, model_id: str
) -> AsyncIterator[bytes]:
    """The SSE body of one streamed request (see the module docstring)."""
    fmt = handle.spec.output_format
    size, seeds = handle.size, handle.seeds
    last_step = 0
    done = False
    try:
        while True:
            item = await handle.next()
            if isinstance(item, Progress):
                if flavor == "native":
                    last_step = item.step
                    yield sse("progress", ProgressEvent(step=item.step, total=item.total))
            elif isinstance(item, Preview):
                images = await handle.encode_preview(item)
                for i, data in enumerate(images):
                    yield _partial(flavor, item, i, data, seeds[i], size, fmt)
            elif isinstance(item, BaseException):
                done = True
                yield error_event(item, request_id)
                return
            else:
                done = True
                if flavor == "native" and last_step < item.steps:
                    # The engine reports progress for jobs still running; the last step is
                    # known done when the result arrives (item.steps: the steps that ran, fewer
                    # than asked for an edit whose strength skips the start).
                    yield sse("progress", ProgressEvent(step=item.steps, total=item.steps))
                for chunk in _completed(model_id, flavor, item, size, fmt):
                    yield chunk
                return
    finally:
        if not done:
            # The client left (Starlette cancelled this writer) or the server is stopping.
            handle.abandoned()


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


def _completed(model_id: str, flavor: Flavor, out: Outcome, size: str, fmt: str) -> list[bytes]:
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
    handle = await qds.submit(
        params, owner=client_key(request), stream=True, partial_images=partial_images
    )
    request_id = getattr(request.state, "request_id", None)
    model_id = qds.public_id(handle.spec.key)

    async def body() -> AsyncIterator[bytes]:
        with qds.metrics.inflight.track_inprogress():
            try:
                async for chunk in event_stream(handle, flavor, request_id, model_id):
                    yield chunk
            finally:
                # The access line is written after the last byte (or the disconnect).
                out = handle.outcome
                request.state.log_extra = {
                    **(out.log_fields() if out is not None else {}),
                    **(log_extra or {}),
                    **handle.buffer.stats(),
                    "stream": flavor,
                    "client_gone": handle.client_gone,
                }

    return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)
