"""GET /v1/models: the configured variants (default, preloaded, loaded) and their state."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.cache import ModelKey
from service.engine import ServiceState
from service.errors import APIError
from service.protocol import ERROR_RESPONSES, ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


def _cards(qds: ServiceState) -> list[ModelCard]:
    entries = {e.key: e for e in qds.cache.entries()}
    keys: list[ModelKey] = [qds.default_key]
    keys += [k for k in qds.preload_variants if k not in keys]
    keys += [k for k in entries if k not in keys]
    cards = []
    for key in keys:
        entry = entries.get(key)
        cards.append(
            ModelCard(
                # The default variant is also reachable by the bare model id.
                id=qds.public_id(key),
                created=int(entry.loaded_at) if entry else 0,
                model=key.model,
                backend=key.backend,
                quant_type=key.quant_type,
                compute_dtype=key.compute_dtype,
                loaded=entry is not None,
                default=key == qds.default_key,
                storage_bytes=entry.storage_bytes if entry else None,
                in_use=entry.in_use if entry else 0,
            )
        )
    return cards


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request.app.state.qds))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request) -> ModelCard:
    qds: ServiceState = request.app.state.qds
    for card in _cards(qds):
        if model_id in (
            card.id,
            f"{card.model}:{card.backend}" + (f":{card.quant_type}" if card.quant_type else ""),
        ):
            return card
    raise APIError(404, f"model {model_id!r} is not listed", param="model", code="model_not_found")
