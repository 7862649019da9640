"""Domain errors of the request path, free of HTTP.

The engine, the variant module and the resolve step raise these; `service.errors` holds the
one table that turns each into a status code and an OpenAI-shaped body. `param` names the
request field at fault (OpenAI's `error.param`), set where the error is raised, never derived
from the message text.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a message for the client, the request field at fault, a machine-readable code."""

    default_code: str = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidValue(ServiceError):
    """A request field is out of range for this server or this model."""

    default_code = "invalid_value"


class ModelNotFound(ServiceError):
    """The requested model id names nothing this server serves."""

    default_code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class ModelNotLoaded(ServiceError):
    """The variant exists but is not loaded and on-demand loading is off."""

    default_code = "model_not_loaded"


class BackendUnavailable(ServiceError):
    """The backend cannot run on this machine (missing library, no GPU, ...)."""

    default_code = "backend_unavailable"


class ModelLoadFailed(ServiceError):
    default_code = "model_load_failed"


class QueueFull(ServiceError):
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ServiceError):
    default_code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message)


class RequestTimeout(ServiceError):
    default_code = "timeout"


class OutOfMemory(ServiceError):
    default_code = "out_of_memory"


class EngineUnavailable(ServiceError):
    """The engine process died (or is restarting): requests in flight cannot finish."""

    default_code = "engine_unavailable"
