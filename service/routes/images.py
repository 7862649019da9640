"""OpenAI Images API: POST /v1/images/generations."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.engine import ServiceState
from service.errors import APIError
from service.protocol import (
    ERROR_RESPONSES,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Usage,
)
from service.routes.common import run_generation
from service.validation import check_dims, parse_size

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
    if body.response_format not in (None, "b64_json"):
        # url responses would need an image store with expiry; clients all handle b64_json.
        raise APIError(
            400,
            f"response_format {body.response_format!r} is not supported; only b64_json is",
            param="response_format",
            code="unsupported_response_format",
        )
    width, height = parse_size(body.size)
    check_dims(width, height, qds.settings, "size")
    out, fmt = await run_generation(
        qds, request, body, width=width, height=height, n=body.n, size_param="size"
    )
    request.state.log_extra = {**out.log_fields(), "user": body.user}
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=base64.b64encode(img).decode("ascii"), seed=seed)
            for img, seed in zip(out.images, out.seeds, strict=True)
        ],
        output_format=fmt,
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
