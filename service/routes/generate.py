"""Native endpoint for curl users: POST /v1/generate returns the image bytes themselves."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.auth import require_api_key
from service.engine import ServiceState
from service.processor import ImageParams
from service.protocol import CONTENT_TYPES, ERROR_RESPONSES, GenerateRequest
from service.responses import native_headers
from service.streaming import stream_response

router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/generate",
    responses={
        200: {
            "content": {
                **{ct: {} for ct in CONTENT_TYPES.values()},
                "text/event-stream": {"schema": {"type": "string"}},
            },
            "description": "The image. Headers: X-Seed, X-Backend, X-Quant-Type, X-Model, "
            "X-Queue-Seconds, X-Inference-Seconds, X-Encode-Seconds, X-Batch-Images, "
            "Server-Timing. With stream: events progress, partial_image, completed, error.",
        },
        **ERROR_RESPONSES,
    },
    response_class=Response,
    summary="Generate one image, returned as raw bytes (or progress events with stream)",
)
async def generate_image(body: GenerateRequest, request: Request) -> Response:
    """`curl -o out.png -d '{"prompt": "a red circle"}' -H 'content-type: application/json'
    http://127.0.0.1:8000/v1/generate`

    With `"stream": true`: server-sent events, `progress` (`{"step", "total"}`) after every
    denoising step, `partial_image` previews when `partial_images` > 0, and a last `completed`
    event carrying the image (`b64_json`), its seed, usage and timings; `error` on failure."""
    qds: ServiceState = request.app.state.qds
    params = ImageParams.from_body(body)
    if body.stream:
        return await stream_response(qds, request, params, "native", body.partial_images or 0)
    out = await qds.run(request, params)
    request.state.log_extra = out.log_fields()
    return Response(
        content=out.images[0],
        media_type=CONTENT_TYPES[params.output_format],
        headers=native_headers(out),
    )
