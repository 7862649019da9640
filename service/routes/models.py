"""GET /v1/models: the configured variants (default, preloaded, loaded) and their state."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from pipelines.lora import parse_loras
from service.auth import require_api_key
from service.engine import ServiceState
from service.protocol import ERROR_RESPONSES, ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


def _cards(qds: ServiceState) -> list[ModelCard]:
    declared = parse_loras(qds.settings.loras)
    cards = qds.variants.cards(qds.cache.entries(), qds.preload_variants, declared)
    return [c.model_copy(update={"step_cache": qds.settings.step_cache}) for c in cards]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request.app.state.qds))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request) -> ModelCard:
    qds: ServiceState = request.app.state.qds
    return qds.variants.find_card(_cards(qds), model_id)
