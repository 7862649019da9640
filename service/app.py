"""The FastAPI application: `create_app()` wires settings, the engine client, metrics and routes.

The app is the HTTP process; the pipelines run in the engine core (engine), started by
the lifespan and stopped after uvicorn has drained the in-flight requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from quantization.settings import QuantSettings
from service.docs_assets import install_docs
from service.engine import ServiceState
from service.errors import install_error_handlers
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.routes import ROUTERS
from service.routes import playground as playground_routes
from service.settings import SHUTDOWN_MARGIN_S, ServiceSettings

log = logging.getLogger("qdserve.app")

# The engine's share of SHUTDOWN_MARGIN_S (EngineClient.stop adds about 2 s to it).
ENGINE_STOP_S = SHUTDOWN_MARGIN_S - 4

DESCRIPTION = """
Image generation with Hugging Face diffusers pipelines quantized by the backend named in
`QDS_QUANT_BACKEND`. `POST /v1/images/generations` is OpenAI compatible (use the official
`openai` client); `POST /v1/generate` returns raw image bytes for curl.
"""
# Appended to DESCRIPTION when QDS_PLAYGROUND is on (a relative link: /docs is beside it).
PLAYGROUND_LINK = """
Try it in a browser: the [playground](playground) generates and edits images and shows the
partial images as they stream.
"""


def create_app(
    quant: QuantSettings | None = None, service: ServiceSettings | None = None
) -> FastAPI:
    """Build the app. Settings default to the environment (`QDS_*`).

    Start-up starts the engine, which loads the default model, so /healthz answers at once and
    /readyz says 503 (with the reason) until the model is loaded and warm.
    """
    quant = quant if quant is not None else QuantSettings()
    service = service if service is not None else ServiceSettings()
    state = ServiceState(quant=quant, settings=service)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests (timeout_graceful_shutdown);
            # anything still queued is answered 503, a running batch finishes, then the
            # engine exits.
            # What was still running at the deadline was answered and cancelled
            # (service.server), so the engine gets a short, fixed time: the whole shutdown
            # stays within QDS_SHUTDOWN_TIMEOUT + SHUTDOWN_MARGIN_S.
            await asyncio.to_thread(state.stop, ENGINE_STOP_S)

    app = FastAPI(
        title="qdserve",
        summary="Quantized diffusers pipelines over HTTP",
        description=DESCRIPTION + (PLAYGROUND_LINK if service.playground else ""),
        version="0.1.0",
        lifespan=lifespan,
        # /docs and /redoc come from service.docs_assets (no CDN); QDS_DOCS=false: no schema.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if service.docs else None,
    )
    app.state.qds = state
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    if service.docs:
        install_docs(app)
    if service.playground:
        app.include_router(playground_routes.router)
    # Added last = outermost: the request context wraps the body limit, so a 413 carries
    # the request id and is logged and counted like any other answer.
    app.add_middleware(BodyLimitMiddleware, settings=service)
    app.add_middleware(RequestContextMiddleware)
    return app
