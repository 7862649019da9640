"""Run the service under uvicorn: `serve(host, port)` is what `qdserve serve` calls."""

from __future__ import annotations

import uvicorn

from quantization.settings import QuantSettings
from service.app import create_app
from service.logs import configure_logging
from service.settings import ServiceSettings


def serve(host: str, port: int) -> None:
    """Serve on host:port with settings from the environment (`QDS_*`); blocks until stopped.

    One process, one event loop: the inference worker is a thread inside it, so more uvicorn
    workers would only duplicate the model in memory. Scale out with more processes / pods.
    """
    service = ServiceSettings()
    configure_logging(service.log_level, service.log_format)
    app = create_app(QuantSettings(), service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=service.log_level.lower(),
        # On SIGTERM uvicorn stops accepting, then waits this long for in-flight requests
        # (running and queued) before the lifespan shutdown answers what is left.
        timeout_graceful_shutdown=int(service.shutdown_timeout) or None,
        access_log=False,  # the service writes its own structured access line
        proxy_headers=True,
    )
    uvicorn.Server(config).run()
