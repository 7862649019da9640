"""The one exception type routes raise, and the handlers that turn errors into OpenAI's shape.

Every error response is `{"error": {"message", "type", "param", "code", "request_id"}}`; no
traceback ever reaches a client (internal errors are logged with the request id instead).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.protocol import error_body

log = logging.getLogger("qdserve.errors")

# Error kinds for the qds_errors_total{kind} counter (the contract in service/metric_names.py).
KIND_BY_STATUS = {429: "rejected", 504: "timeout"}


class APIError(Exception):
    """An error answered to the client as-is (status, OpenAI error body, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = headers or {}
        # Metric kind; validation for 4xx unless said otherwise.
        self.kind = kind or KIND_BY_STATUS.get(status) or ("validation" if status < 500 else None)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(request: Request, err: APIError) -> JSONResponse:
    qds = getattr(request.app.state, "qds", None)
    metrics = qds.metrics if qds is not None else None
    if metrics is not None and err.kind:
        metrics.errors.labels(kind=err.kind).inc()
    return JSONResponse(
        error_body(
            err.message,
            type=err.type,
            param=err.param,
            code=err.code,
            request_id=request_id_of(request),
        ),
        status_code=err.status,
        headers=err.headers,
    )


def _validation_param(loc: tuple[object, ...]) -> str | None:
    # FastAPI prefixes body errors with "body"; OpenAI names the field alone.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _validation_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        if first.get("type") == "missing":
            code = "missing_required_parameter"
        message = f"{param}: {msg}" if param else msg
        return error_response(request, APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            request,
            APIError(
                exc.status_code,
                str(exc.detail),
                code=code,
                headers=dict(exc.headers or {}),
                kind="validation" if exc.status_code < 500 else "internal",
            ),
        )
