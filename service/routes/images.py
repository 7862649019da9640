"""OpenAI Images API: POST /v1/images/generations."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.engine import ServiceState
from service.protocol import (
    ERROR_RESPONSES,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Usage,
)
from service.resolve import ImageParams

router = APIRouter(tags=["images"], dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    summary="Generate images (OpenAI compatible)",
)
async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    """OpenAI's Images API. `data[i].seed` reproduces image i alone (image i uses seed + i);
    `backend` / `quant_type` say which cache entry served the request."""
    qds: ServiceState = request.app.state.qds
    params = ImageParams.from_body(body)
    out = await qds.run(request, params)
    request.state.log_extra = {**out.log_fields(), "user": body.user}
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=base64.b64encode(img).decode("ascii"), seed=seed)
            for img, seed in zip(out.images, out.seeds, strict=True)
        ],
        output_format=params.output_format,
        size=f"{out.width}x{out.height}",
        model=qds.public_id(out.key),
        backend=out.key.backend,
        quant_type=out.key.quant_type,
        usage=Usage(
            queue_seconds=round(out.queue_seconds, 6),
            inference_seconds=round(out.inference_seconds, 6),
            encode_seconds=round(out.encode_seconds, 6),
            batch_images=out.batch_images,
        ),
    )
