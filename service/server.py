"""Run the service under uvicorn: `serve(host, port)` is what `qdserve serve` calls."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from engine.logs import configure_logging
from quantization.settings import QuantSettings
from service.app import create_app
from service.auth import no_auth_warning
from service.settings import ServiceSettings

log = logging.getLogger("qdserve.server")


def uvicorn_config(app: Any, settings: ServiceSettings, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration `serve()` runs with; the tests' servers use it too.

    One process, one event loop: more uvicorn workers would only duplicate the model in
    memory. Scale out with more processes / pods.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        # On SIGTERM uvicorn stops accepting, then waits this long for in-flight requests
        # (running and queued) before the lifespan shutdown answers what is left. Passed as
        # given: uvicorn hands it to asyncio.wait_for, which takes any float, and 0 means do
        # not wait (uvicorn's None, "wait forever", is never what this setting asks for).
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]
        access_log=False,  # the service writes its own structured access line
        proxy_headers=True,
    )


# How long before uvicorn's graceful-shutdown timeout the unfinished requests are answered:
# enough for their handlers to write a 503 before uvicorn cancels them.
DEADLINE_MARGIN_S = 0.5


class Server(uvicorn.Server):
    """uvicorn's server, except that requests still unfinished near the graceful-shutdown
    deadline get an OpenAI-shaped 503 `shutting_down` instead of the plain-text 500 uvicorn
    writes for the tasks it cancels. (uvicorn has no hook for this: its `shutdown` waits for
    the tasks, then cancels them.) A request in a stage that waits on no engine job (an upload
    being read or decoded, a result being encoded), or any request with
    QDS_SHUTDOWN_TIMEOUT=0, is cancelled by uvicorn; `RequestContextMiddleware` answers those
    with the same 503 (or an SSE `error` event when the stream had begun)."""

    def __init__(self, config: uvicorn.Config, on_deadline: Callable[[], object]) -> None:
        super().__init__(config)
        self.on_deadline = on_deadline

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        handle = None
        if timeout:
            delay = max(0.0, timeout - min(DEADLINE_MARGIN_S, timeout / 2))
            handle = asyncio.get_running_loop().call_later(delay, self.on_deadline)
        else:
            # No time to wait: answer what waits on the engine now (its handlers write their
            # 503 while uvicorn closes the listeners); whatever uvicorn then cancels (uploads,
            # encoding) is answered by the request middleware.
            self.on_deadline()
        try:
            await super().shutdown(sockets)
        finally:
            if handle is not None:
                handle.cancel()


def server_for(app: Any, settings: ServiceSettings, *, host: str, port: int) -> Server:
    """The server `qdserve serve` runs (the tests' servers too)."""
    config = uvicorn_config(app, settings, host=host, port=port)
    return Server(config, on_deadline=app.state.qds.abandon_pending)


def serve(host: str, port: int) -> None:
    """Serve on host:port with settings from the environment (`QDS_*`); blocks until stopped."""
    service = ServiceSettings()
    configure_logging(service.log_level, service.log_format)
    app = create_app(QuantSettings(), service)
    warning = no_auth_warning(host, bool(service.api_keys))
    if warning:
        log.warning("%s", warning)
        app.state.qds.warnings.append(warning)
    server_for(app, service, host=host, port=port).run()
