"""Logging: JSON lines (default) or text, with the request id of the current request."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from engine.startup_noise import silence_startup_noise

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "qds_request_id", default=None
)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    # Extra keys a log call may attach (the per-request access line uses them).
    FIELDS = (
        "request_id",
        "method",
        "path",
        "status",
        "duration_s",
        "backend",
        "model",
        "quant_type",
        "queue_s",
        "inference_s",
        "images",
        "size",
        "user",
        "load_s",
        "storage_bytes",
    )

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """One human-readable line; the access line's fields (backend, model, queue wait, ...)
    follow the message as key=value so text logs carry what the JSON ones do."""

    # Already in the message (method, path, status, duration) or in brackets (request id).
    SKIP = frozenset({"request_id", "method", "path", "status", "duration_s"})

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [
            f"{key}={value}"
            for key in JsonFormatter.FIELDS
            if key not in self.SKIP and (value := getattr(record, key, None)) is not None
        ]
        if not pairs:
            return line
        head, sep, exc = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(pairs)}{sep}{exc}"


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("qdserve")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Third-party start-up notices that need no action (listed, with reasons, there).
    silence_startup_noise()
