"""Errors to HTTP, in one place: the table from domain errors to status codes, and the
handlers that answer every error in OpenAI's shape.

Every error response is `{"error": {"message", "type", "param", "code", "request_id"}}`; no
traceback ever reaches a client (internal errors are logged with the request id instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.failures import (
    BackendUnavailable,
    EngineUnavailable,
    Failure,
    ModelLoadFailed,
    ModelNotLoaded,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
)
from service.exceptions import InvalidValue, ModelNotFound, RequestTimeout
from service.protocol import FIELD_ERROR_CODES, FIELD_HINTS, error_body

log = logging.getLogger("qdserve.errors")


@dataclass(frozen=True)
class HttpMapping:
    status: int
    # Label of qds_errors_total{kind} (the contract in service/metric_names.py); None: uncounted.
    kind: str | None
    # The request field to blame when the error does not name one itself.
    param: str | None = None


# The one table from domain errors to HTTP. Looked up along the exception's MRO, so a
# subclass inherits its parent's row unless it has its own.
HTTP_MAPPING: dict[type[Failure], HttpMapping] = {
    InvalidValue: HttpMapping(400, "validation"),
    ModelNotFound: HttpMapping(404, "validation", param="model"),
    # 400, not 404: the model exists, this server is configured not to load it on demand.
    ModelNotLoaded: HttpMapping(400, "validation", param="quant_backend"),
    BackendUnavailable: HttpMapping(400, "validation", param="quant_backend"),
    QueueFull: HttpMapping(429, "rejected"),
    RequestTimeout: HttpMapping(504, "timeout"),
    ShuttingDown: HttpMapping(503, None),
    OutOfMemory: HttpMapping(503, "oom"),
    ModelLoadFailed: HttpMapping(503, "internal"),
    EngineUnavailable: HttpMapping(503, "internal"),
}


class APIError(Exception):
    """An error already in HTTP terms (auth, the framework's own errors, the mapped ones)."""

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
        self.kind = kind or ("validation" if status < 500 else None)


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


def to_api_error(exc: Failure) -> APIError:
    """A domain error in HTTP terms, by the table above."""
    mapping = next(
        (HTTP_MAPPING[cls] for cls in type(exc).__mro__ if cls in HTTP_MAPPING),
        HttpMapping(500, "internal"),
    )
    if getattr(exc, "detail", ""):
        # The full text (allocator dump, a load's exception) goes to the log, with the
        # request id from the log context; the client gets the message alone.
        log.error("%s: %s (detail: %s)", exc.code, exc.message, exc.detail)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return APIError(
        mapping.status,
        exc.message,
        param=exc.param or mapping.param,
        code=exc.code,
        headers=headers,
        kind=mapping.kind,
    )


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


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first error as OpenAI's 400, `param` the field (from pydantic's `loc`)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _validation_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    kind = first.get("type")
    if kind == "json_invalid":
        code = "invalid_json"
        # The loc is a character offset, not a field.
        param = None
    elif kind == "missing":
        code = "missing_required_parameter"
    else:
        code = FIELD_ERROR_CODES.get(param or "", "invalid_value")
    hint = FIELD_HINTS.get(param or "")
    if hint and kind != "missing":
        msg = f"{msg}; expected {hint}"
    message = f"{param}: {msg}" if param else msg
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Failure)
    async def _domain(request: Request, exc: Failure) -> JSONResponse:
        return error_response(request, to_api_error(exc))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
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
