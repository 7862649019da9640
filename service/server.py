"""Run the service under uvicorn: `serve(host, port)` is what `qdserve serve` calls."""

from __future__ import annotations

from typing import Any

import uvicorn

from quantization.settings import QuantSettings
from service.app import create_app
from service.logs import configure_logging
from service.settings import ServiceSettings


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


def serve(host: str, port: int) -> None:
    """Serve on host:port with settings from the environment (`QDS_*`); blocks until stopped."""
    service = ServiceSettings()
    configure_logging(service.log_level, service.log_format)
    app = create_app(QuantSettings(), service)
    uvicorn.Server(uvicorn_config(app, service, host=host, port=port)).run()
