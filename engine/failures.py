"""The typed failures of the engine: what the engine process and its client can answer a job or
a load with instead of a result.

They cross the pipe as themselves (pickled), so the HTTP side maps each type to a status once
(`service.errors.HTTP_MAPPING`, beside the request-validation errors of `service.exceptions`,
which share the `Failure` base). A `Failure`'s message is written for the client; an
`EngineError` (an unexpected exception) is not: logged with the request id, never shown.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[Failure], state: dict[str, Any]) -> Failure:
    failure = cls.__new__(cls)
    Exception.__init__(failure, state.get("message", ""))
    failure.__dict__.update(state)
    return failure


class Failure(Exception):
    """Base: a message for the client, the request field at fault, a machine-readable code,
    and `detail`: the full text behind it (torch's allocator line, a load's exception), for
    the log only: the HTTP side logs it with the request id and never sends it."""

    default_code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling replays positional args only: keep param, code and the
        # subclasses' fields (retry_after) across the pipe.
        return (_rebuild, (type(self), dict(self.__dict__)))


class EngineUnavailable(Failure):
    """The engine process died, hung or is restarting: requests in flight cannot finish.
    Retryable: `retry_after` (seconds) becomes the 503's Retry-After."""

    default_code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Failure):
    default_code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message)


class QueueFull(Failure):
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutOfMemory(Failure):
    default_code = "out_of_memory"


class BackendUnavailable(Failure):
    """The backend cannot run on this machine (missing library, no GPU, ...)."""

    default_code = "backend_unavailable"


class ModelLoadFailed(Failure):
    default_code = "model_load_failed"


class ModelNotLoaded(Failure):
    """The variant exists but is not loaded and on-demand loading is off."""

    default_code = "model_not_loaded"


class EngineError(Exception):
    """An unexpected exception while the engine ran a job. Not a `Failure`: its text is for
    the log only; the HTTP side answers it as an internal error (500 with the request id)."""


def out_of_memory(detail: str) -> OutOfMemory:
    """A batch ran out of device memory; `detail` is torch's first line (for the log: it
    names devices and allocator figures)."""
    return OutOfMemory(
        "out of memory while generating this batch; memory was released and the service "
        "keeps serving: retry with fewer images, a smaller size or a smaller quant type",
        detail=detail,
    )


def load_failed(variant_id: str, detail: str) -> ModelLoadFailed:
    """A model load failed; `detail` (the exception's text: paths, hub URLs) is for the log."""
    return ModelLoadFailed(
        f"loading the model variant {variant_id} failed on the server; retry later, or use "
        "another variant (the server log has the cause under this request's id)",
        detail=detail,
    )


def step_failure(oom: str | None, error: str | None, variant_id: str) -> Failure | EngineError:
    """What a job is failed with after `lanes.classify` sorted its batch's exception."""
    if oom is not None:
        return out_of_memory(oom)
    return EngineError(f"the engine failed running {variant_id}: {error or ''}")
