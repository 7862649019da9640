"""OpenAI Images API: POST /v1/images/generations (JSON, or server-sent events with stream)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.engine import ServiceState
from service.protocol import ERROR_RESPONSES, ImageGenerationRequest, ImagesResponse
from service.resolve import ImageParams
from service.responses import images_response

router = APIRouter(tags=["images"], dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    # Absent, not null: OpenAI's schema types revised_prompt (and quant_type's peers) as
    # strings, so a typed client generated from it rejects a null.
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Generate images (OpenAI compatible)",
)
async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    """OpenAI's Images API. `data[i].seed` reproduces image i alone (image i uses seed + i);
    `backend` / `quant_type` say which cache entry served the request, `timings` where its
    time went; `usage` counts tokens as OpenAI does (see the README)."""
    qds: ServiceState = request.app.state.qds
    params = ImageParams.from_body(body)
    out = await qds.run(request, params)
    request.state.log_extra = {**out.log_fields(), "user": body.user}
    return images_response(out, params.output_format, qds.public_id(out.key))
