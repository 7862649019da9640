"""The output path: one `RequestHandle` per submitted request owns everything that comes back
for it, and the endpoints only render it.

    engine (its own process)          HTTP process (event loop)
    ------------------------          -------------------------
    Progress / Preview / Finished --> EngineClient reader --> RequestHandle (StreamBuffer)
    / Failed for the job                                        |-- result():  JSON, raw bytes
                                                                `-- next():    SSE events

The handle holds the job's events in one bounded buffer, the deadline, the client's
departure (the job is withdrawn from the engine: `client_gone`, `timeout`), and the encoding
of images (on the loop when tiny, else in a thread, overlapping the engine's next step).
`service.responses` renders a finished `Outcome` as JSON or raw-bytes headers;
`service.streaming` renders the events as OpenAI's (or the native) server-sent events.

Backpressure: the engine never waits for the HTTP side, and the HTTP side never waits for a
client in the engine's path. Events reach the buffer from the event loop without awaiting; it
keeps at most the latest progress, `MAX_PENDING_PREVIEWS` previews not yet sent (a newer one
replaces the oldest) and the final result or error, which is never dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.messages import Finished, Preview, Progress
from service.imaging import encode_all
from service.processor import JobSpec, timeout_error

if TYPE_CHECKING:
    from fastapi import Request

    from engine.client import PendingJob
    from engine.keys import ModelKey
    from pipelines.token_usage import TokenUsage
    from service.exceptions import RequestTimeout

log = logging.getLogger("qdserve.outputs")

# Results (and previews) of at most this many pixels, all images together, are encoded on the
# event loop (a noisy 32x32 PNG: ~0.2 ms; 128x128: ~1.4 ms, the most the loop is held):
# cheaper than the hop to a thread and back. Larger ones go to a thread (PNG level 1: ~56 ms
# for 1024x1024), where Pillow's encoder releases the GIL, so the loop keeps serving.
INLINE_ENCODE_PIXELS = 128 * 128
# Previews waiting for a slow writer; a newer one replaces the oldest beyond this.
MAX_PENDING_PREVIEWS = 1
# Fallback disconnect polling period, only for an ASGI server whose `receive` answers at once
# with something other than a disconnect once the body is read (uvicorn blocks until then).
_POLL_S = 0.1


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing will read the answer."""


@dataclass
class Outcome:
    key: ModelKey
    images: list[bytes]
    seeds: list[int]
    width: int
    height: int
    steps: int
    queue_seconds: float
    inference_seconds: float
    encode_seconds: float
    batch_images: int
    # Token counts from the engine (pipelines.token_usage), for OpenAI's `usage`.
    usage: TokenUsage | None = None

    def log_fields(self) -> dict[str, object]:
        """The access-log fields every generation endpoint records (bounded, no prompt)."""
        return {
            "backend": self.key.backend,
            "quant_type": self.key.quant_type,
            "model": self.key.model,
            "queue_s": round(self.queue_seconds, 4),
            "inference_s": round(self.inference_seconds, 4),
            "images": len(self.images),
            "size": f"{self.width}x{self.height}",
        }


@dataclass
class StreamBuffer:
    """The bounded buffer between the engine's events (pushed on the loop, never awaiting)
    and one request's reader. Holds at most: the latest progress, MAX_PENDING_PREVIEWS
    previews, the final result or error."""

    max_previews: int = MAX_PENDING_PREVIEWS
    progress: Progress | None = None
    previews: collections.deque[Preview] = field(default_factory=collections.deque)
    final: Any = None  # the engine's Finished event
    error: BaseException | None = None
    # Accounting (the access log carries it): what a slow reader made the buffer skip.
    progress_coalesced: int = 0
    previews_dropped: int = 0
    previews_sent: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    # -- producer side (event loop; never awaits) -----------------------------------------
    def on_event(self, event: Progress | Preview) -> None:
        """An engine event for this job: `Progress` or `Preview` (engine.messages)."""
        if isinstance(event, Progress):
            if self.progress is not None:
                self.progress_coalesced += 1
            self.progress = event
        else:
            if len(self.previews) >= self.max_previews:
                self.previews.popleft()
                self.previews_dropped += 1
            self.previews.append(event)
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

    # -- consumer side ---------------------------------------------------------------------
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


@dataclass
class RequestHandle:
    """One submitted request: its spec, its engine job and everything that comes back."""

    spec: JobSpec
    job: PendingJob
    # Withdraws the job from the engine (`EngineClient.cancel`): True if it had not started.
    withdraw: Callable[[PendingJob, str], bool]
    request_timeout: float
    buffer: StreamBuffer = field(default_factory=StreamBuffer)
    outcome: Outcome | None = None  # set once encoded (the access log reads it)
    client_gone: bool = False

    def __post_init__(self) -> None:
        self.job.future.add_done_callback(self.buffer.on_done)

    @property
    def seeds(self) -> list[int]:
        return self.spec.seeds

    @property
    def size(self) -> str:
        return f"{self.spec.request.width}x{self.spec.request.height}"

    def cancel(self, reason: str) -> bool:
        return self.withdraw(self.job, reason)

    def timeout_error(self) -> RequestTimeout:
        where = "while running" if self.job.started else "while queued (removed from the queue)"
        return timeout_error(self.request_timeout, where)

    # -- a response in one piece (JSON, raw bytes) -------------------------------------------
    async def result(self, request: Request) -> Outcome:
        """The encoded result, under the deadline; the job is withdrawn if the client leaves.

        The disconnect is awaited (one task blocked in the ASGI `receive`, which uvicorn
        answers with http.disconnect when the connection drops), not polled: polling with
        `request.is_disconnected()` every 100 ms cost each waiting request ten wake-ups a
        second, each building and cancelling an anyio cancel scope (measured at concurrency
        16); it also notices a departure at once.
        """
        future = self.job.future
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            remaining = self.spec.deadline - time.monotonic()
            if remaining > 0:
                await asyncio.wait(
                    {future, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        except asyncio.CancelledError:
            # The handler itself was cancelled (forced shutdown): withdraw the job.
            self.cancel("shutdown")
            raise
        finally:
            gone.cancel()
        if not future.done():
            if gone.done() and not gone.cancelled():
                queued = self.cancel("client_gone")
                self.client_gone = True
                log.info("client left; job %s", "dropped before start" if queued else "abandoned")
                raise ClientGone
            error = self.timeout_error()
            self.cancel("timeout")
            raise error
        return await self.encode(future.result())

    # -- a response as events (SSE) ----------------------------------------------------------
    async def next(self) -> Progress | Preview | Outcome | BaseException:
        """The next event of the job: progress, a preview, then the encoded result or the
        error. At the deadline the job is withdrawn and the timeout is the error."""
        try:
            item = await self.buffer.next(self.spec.deadline - time.monotonic())
        except TimeoutError:
            self.cancel("timeout")
            return self.timeout_error()
        if isinstance(item, (Progress, Preview, BaseException)):
            return item
        return await self.encode(item)

    def abandoned(self) -> None:
        """The reader stopped before the end (the client left, or the server is stopping)."""
        self.client_gone = True
        self.cancel("client_gone")
        log.info("stream client left; job %s withdrawn", self.job.job_id)

    # -- encoding ----------------------------------------------------------------------------
    async def encode(self, finished: Finished) -> Outcome:
        """A finished job's images in the requested format (on the loop if tiny, else in a
        thread)."""
        result = finished.result
        start = time.perf_counter()
        images = await self._encode(result.images)
        self.outcome = Outcome(
            key=self.spec.key,
            images=images,
            seeds=result.seeds,
            width=result.width,
            height=result.height,
            steps=result.steps,
            queue_seconds=finished.queue_seconds,
            inference_seconds=result.inference_seconds,
            encode_seconds=time.perf_counter() - start,
            batch_images=finished.batch_images,
            usage=result.usage,
        )
        return self.outcome

    async def encode_preview(self, preview: Preview) -> list[bytes]:
        return await self._encode(preview.images)

    async def _encode(self, images: list[Any]) -> list[bytes]:
        fmt, compression = self.spec.output_format, self.spec.output_compression
        if sum(img.width * img.height for img in images) <= INLINE_ENCODE_PIXELS:
            return encode_all(images, fmt, compression)
        return await asyncio.to_thread(encode_all, images, fmt, compression)


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body has been read already)."""
    try:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return
            # Not uvicorn's blocking receive: fall back to polling rather than spinning.
            await asyncio.sleep(_POLL_S)
    except Exception as exc:  # never fail a request over disconnect detection
        log.debug("disconnect detection stopped: %r", exc)
        await asyncio.get_running_loop().create_future()  # until cancelled
