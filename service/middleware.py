"""Pure-ASGI middleware: request id, request metrics, one access-log line, and the last-resort
500 handler (so an internal error still carries X-Request-ID and never a traceback).

Pure ASGI rather than BaseHTTPMiddleware: the latter wraps `receive`, which breaks the
endpoint's client-disconnect detection.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import ClientGone
from service.logs import request_id_var
from service.protocol import error_body

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
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientGone:
            status = CLIENT_CLOSED
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


async def _send_json(send: Send, status: int, body: dict[str, Any], rid: str) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-request-id", rid.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
