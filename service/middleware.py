"""Pure-ASGI middleware: request id, request metrics, one access-log line, the last-resort
500 handler (so an internal error still carries X-Request-ID and never a traceback), and the
request body limit (413 while the body streams in, before anything buffers it).

Pure ASGI rather than BaseHTTPMiddleware: the latter wraps `receive`, which breaks the
endpoint's client-disconnect detection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.logs import request_id_var
from service.outputs import ClientGone
from service.protocol import error_body
from service.settings import ServiceSettings
from service.streaming import sse

log = logging.getLogger("qdserve.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Status logged / counted for a client that left before its answer (nginx's convention).
CLIENT_CLOSED = 499


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        # Accept the client's id when it is safe to log and echo; otherwise make one.
        rid = supplied if _VALID_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        status = 500
        response_started = False
        response_complete = False
        event_stream = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, response_complete, event_stream
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                event_stream = headers.get("content-type", "").startswith("text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                response_complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientGone:
            status = CLIENT_CLOSED
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when QDS_SHUTDOWN_TIMEOUT runs out (at once
            # with 0): a request reading or decoding its upload, encoding its result, or any
            # request uvicorn got to first. It would write a plain-text 500; answer in the API's
            # shape instead, then let the task end quietly (uvicorn is only ending it).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if not response_started:
                status = 503
                await _send_json(send, 503, _shutting_down_body(rid), rid)
            elif event_stream and not response_complete:
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse("error", _shutting_down_body(rid)),
                        "more_body": False,
                    }
                )
        except Exception:
            log.exception("internal error (request id %s)", rid)
            state = getattr(scope.get("app"), "state", None)
            qds = getattr(state, "qds", None)
            if qds is not None:
                qds.metrics.errors.labels(kind="internal").inc()
            if not response_started:
                status = 500
                await _send_json(
                    send,
                    500,
                    error_body(
                        f"internal error; quote request id {rid} when reporting it",
                        type="server_error",
                        code="internal_error",
                        request_id=rid,
                    ),
                    rid,
                )
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            app = scope.get("app")
            qds = getattr(getattr(app, "state", None), "qds", None)
            if qds is not None:
                qds.metrics.requests.labels(endpoint, str(status)).inc()
                qds.metrics.request_duration.labels(endpoint, str(status)).observe(elapsed)
            if endpoint not in ("/metrics", "/healthz", "/readyz"):
                extra: dict[str, Any] = {
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_s": round(elapsed, 4),
                    **scope["state"].get("log_extra", {}),
                }
                log.info(
                    "%s %s %d %.3fs",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    elapsed,
                    extra=extra,
                )
            request_id_var.reset(token)


def _shutting_down_body(rid: str) -> dict[str, Any]:
    return error_body(
        "the server is shutting down and this request could not finish in time "
        "(QDS_SHUTDOWN_TIMEOUT); retry on another replica",
        type="server_error",
        code="shutting_down",
        request_id=rid,
    )


async def _send_json(send: Send, status: int, body: dict[str, Any], rid: str) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if rid:
        headers.append((b"x-request-id", rid.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request bodies over the configured size with 413, without buffering them.

    A declared Content-Length over the limit is refused before a byte of the body is read;
    a chunked (or under-declared) body is counted as it streams and refused at the chunk that
    crosses the limit, so at most one server read buffer (64 KiB in uvicorn) past the limit is
    ever held. multipart/form-data (image uploads) has its own, larger limit. Starlette and
    FastAPI have no body limit of their own, and uvicorn's `h11_max_incomplete_event_size`
    bounds only headers, hence this.
    """

    def __init__(self, app: ASGIApp, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, headers: Headers) -> tuple[int, str]:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            return self.settings.max_upload_bytes, "QDS_MAX_UPLOAD_BYTES"
        return self.settings.max_body_bytes, "QDS_MAX_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit, setting = self._limit(headers)
        message = f"request body exceeds {setting}={limit} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, f"{message} (Content-Length: {declared})")
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPException from body parsing (anything else it turns
                    # into a 400), so the app's handlers answer it in the OpenAI shape.
                    raise HTTPException(413, message)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal response_started
            if msg["type"] == "http.response.start":
                response_started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as exc:
            # Raised where no handler saw it (a body read outside FastAPI's parsing).
            if exc.status_code != 413 or response_started:
                raise
            await _refuse(scope, send, message)


async def _refuse(scope: Scope, send: Send, message: str) -> None:
    state = scope.get("state") or {}
    rid = state.get("request_id") or ""
    qds = getattr(getattr(scope.get("app"), "state", None), "qds", None)
    if qds is not None:
        qds.metrics.errors.labels(kind="validation").inc()
    body = error_body(message, code="request_too_large", request_id=rid or None)
    # The unread body stays unread: uvicorn closes the connection after this response.
    await _send_json(send, 413, body, rid)
