"""Liveness, readiness and metrics: never behind API keys (probes and scrapers have none)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.engine import ServiceState

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Process alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Default model loaded and warm (503 with a reason otherwise)",
    responses={503: {"description": "Loading, warming up, failed load, or shutting down."}},
)
async def readyz(request: Request) -> JSONResponse:
    qds: ServiceState = request.app.state.qds
    body = {
        "status": "ready" if qds.ready else "not_ready",
        "reason": qds.reason,
        "model": qds.default_key.variant_id,
        "mode": qds.mode,
        "loaded": qds.loaded_ids(),
        "queue_depth": qds.queue_depth(),
        "auth": "on" if qds.settings.api_keys else "off",
        "warnings": qds.all_warnings(),
    }
    return JSONResponse(body, status_code=200 if qds.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    qds: ServiceState = request.app.state.qds
    qds.metrics.queue_depth.set(qds.queue_depth())
    return Response(qds.metrics.render(), media_type=CONTENT_TYPE_LATEST)
