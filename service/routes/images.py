"""OpenAI Images API: POST /v1/images/generations (JSON, or server-sent events with stream)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.auth import require_api_key
from service.engine import ServiceState
from service.processor import ImageParams
from service.protocol import ERROR_RESPONSES, ImageGenerationRequest, ImagesResponse
from service.responses import images_response
from service.streaming import stream_response

router = APIRouter(tags=["images"], dependencies=[Depends(require_api_key)])

# The 200 answer with stream: true (OpenAPI lists both media types, as OpenAI's spec does).
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "With stream: image_generation.partial_image events "
                    "(partial_images of them at most), then one image_generation.completed "
                    "per image; an `error` event if the request fails after the stream began.",
                }
            }
        }
    }
}


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    # Absent, not null: OpenAI's schema types revised_prompt (and quant_type's peers) as
    # strings, so a typed client generated from it rejects a null.
    response_model_exclude_none=True,
    responses={**SSE_RESPONSE, **ERROR_RESPONSES},
    summary="Generate images (OpenAI compatible)",
)
async def create_images(
    body: ImageGenerationRequest, request: Request
) -> ImagesResponse | StreamingResponse:
    """OpenAI's Images API. `data[i].seed` reproduces image i alone (image i uses seed + i);
    `backend` / `quant_type` say which cache entry served the request, `timings` where its
    time went; `usage` counts tokens as OpenAI does (see the README). With `stream: true` the
    answer is OpenAI's server-sent events, `partial_images` (0-3) previews first."""
    qds: ServiceState = request.app.state.qds
    params = ImageParams.from_body(body)
    if body.stream:
        return await stream_response(
            qds,
            request,
            params,
            "generation",
            body.partial_images or 0,
            log_extra={"user": body.user},
        )
    out = await qds.run(request, params)
    request.state.log_extra = {**out.log_fields(), "user": body.user}
    return images_response(out, params.output_format, qds.public_id(out.key))
