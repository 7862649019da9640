"""Request errors of the HTTP side, free of HTTP: a request the server cannot take as asked.

They share `engine.failures.Failure` with the engine's typed failures, so `service.errors`
holds the one table that turns each into a status code and an OpenAI-shaped body. `param`
names the request field at fault (OpenAI's `error.param`), set where the error is raised,
never derived from the message text.
"""

from __future__ import annotations

from engine.failures import Failure


class InvalidValue(Failure):
    """A request field is out of range for this server or this model."""

    default_code = "invalid_value"


class ModelNotFound(Failure):
    """The requested model id names nothing this server serves."""

    default_code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class RequestTimeout(Failure):
    default_code = "timeout"
