"""Image edits: OpenAI's POST /v1/images/edits and the native POST /v1/edit (image bytes).

Both are multipart/form-data: the files `image` (or `image[]`; one image) and optionally
`mask`, every other field a text part validated by the protocol's models. Without a mask the
edit is img2img, with one it is inpainting (service.uploads has the upload rules,
pipelines.edit the pipelines). After parsing, an edit goes the generations' way: the same
resolve step, engine path, errors, metrics and response models.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service.auth import require_api_key
from service.engine import ServiceState
from service.outputs import ClientGone
from service.processor import ImageParams, parse_size
from service.protocol import (
    CONTENT_TYPES,
    ERROR_RESPONSES,
    EditBytesRequest,
    ImageEditRequest,
    ImagesResponse,
)
from service.responses import images_response, native_headers
from service.streaming import stream_response
from service.uploads import EditImages, decode_edit_images, read_edit_form

router = APIRouter(dependencies=[Depends(require_api_key)])
M = TypeVar("M", bound=BaseModel)

_BINARY = {"type": "string", "format": "binary"}


def _multipart(model: type[BaseModel], image_description: str) -> dict[str, Any]:
    """The OpenAPI request body: the model's text fields plus the file fields (FastAPI does
    not see them: the body is parsed by service.uploads)."""
    schema = model.model_json_schema()
    properties = {
        "image": {
            "anyOf": [_BINARY, {"type": "array", "items": _BINARY, "maxItems": 1}],
            "description": image_description,
        },
        "mask": {
            **_BINARY,
            "description": "Optional PNG/WebP with an alpha channel, the image's dimensions: "
            "its fully transparent pixels (alpha 0) mark the area to edit (inpainting); "
            "without a mask the whole image is edited (img2img).",
        },
        **schema["properties"],
    }
    required = ["image", *schema.get("required", [])]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": properties, "required": required}
                }
            },
        }
    }


_IMAGE_DOC = (
    "The image to edit: PNG, JPEG or WebP (sniffed from its bytes), at most "
    "QDS_MAX_UPLOAD_PIXELS pixels; EXIF orientation is applied. One image: a list "
    "(`image[]`) of more than one is refused."
)

EDIT_SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "With stream: image_edit.partial_image events (when the "
                    "pipeline can preview), then one image_edit.completed per image; an "
                    "`error` event if the request fails after the stream began.",
                }
            }
        }
    }
}


async def _parse(request: Request, model: type[M]) -> tuple[M, EditImages]:
    """The text fields validated by `model` (400s in the usual shape), then the uploads."""
    qds: ServiceState = request.app.state.qds
    try:
        form = await read_edit_form(request, qds.settings.max_upload_bytes)
    except ClientDisconnect:
        raise ClientGone from None
    try:
        body = model.model_validate(form.fields)
    except ValidationError as exc:
        # FastAPI's shape (loc starts with "body"), so service.errors answers as for JSON.
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    # Admission before decoding: a request that would be refused (429) costs no decode.
    qds.admit(request)
    # Always in a thread: a few KiB of PNG can hold QDS_MAX_UPLOAD_PIXELS pixels, so the
    # bytes do not bound the decoding time, and the loop must not wait on it. At most
    # QDS_MAX_CONCURRENT_DECODES at once: each holds a full-resolution image until it is
    # brought down to the output size (service.uploads.bound).
    async with qds.decodes:
        images = await asyncio.to_thread(
            decode_edit_images,
            form,
            qds.settings.max_upload_pixels,
            output_size=_output_size(body),
            fit_pixels=qds.settings.max_pixels,
        )
    return body, images


def _output_size(body: BaseModel) -> tuple[int, int] | None:
    """The output size the request names (both sides), else None (decided from the input)."""
    size = getattr(body, "size", None)
    if size is not None:
        width, height = parse_size(size)
    else:
        width, height = getattr(body, "width", None), getattr(body, "height", None)
    return (int(width), int(height)) if width and height else None


def _params(
    body: ImageEditRequest | EditBytesRequest,
    images: EditImages,
    *,
    n: int,
    width: int | None,
    height: int | None,
    size_field: str | None,
) -> ImageParams:
    return ImageParams.of(
        body,
        n=n,
        width=width,
        height=height,
        size_field=size_field,
        edit=images,
        strength=body.strength,
    )


def _log_fields(images: EditImages) -> dict[str, object]:
    w, h = images.input_size
    return {"edit": "inpaint" if images.mask is not None else "img2img", "input_size": f"{w}x{h}"}


@router.post(
    "/v1/images/edits",
    tags=["images"],
    response_model=ImagesResponse,
    # Absent, not null, as on /v1/images/generations (OpenAI's schema types them as strings).
    response_model_exclude_none=True,
    responses={**EDIT_SSE_RESPONSE, **ERROR_RESPONSES},
    openapi_extra=_multipart(ImageEditRequest, _IMAGE_DOC),
    summary="Edit an image: img2img, or inpainting with a mask (OpenAI compatible)",
)
async def create_edit(request: Request) -> ImagesResponse | StreamingResponse:
    """OpenAI's image edits (`client.images.edit(image=..., mask=..., prompt=...)`).
    `data[i].seed` reproduces image i alone (image i uses seed + i); `strength` (extension)
    sets how much of the input survives. With `stream: true`, OpenAI's image_edit.* events."""
    qds: ServiceState = request.app.state.qds
    body, images = await _parse(request, ImageEditRequest)
    width, height = parse_size(body.size)
    params = _params(body, images, n=body.n, width=width, height=height, size_field="size")
    extra = {**_log_fields(images), "user": body.user}
    if body.stream:
        return await stream_response(
            qds, request, params, "edit", body.partial_images or 0, log_extra=extra
        )
    out = await qds.run(request, params)
    request.state.log_extra = {**out.log_fields(), **extra}
    return images_response(out, params.output_format, qds.public_id(out.key))


@router.post(
    "/v1/edit",
    tags=["native"],
    responses={
        200: {
            "content": {
                **{ct: {} for ct in CONTENT_TYPES.values()},
                "text/event-stream": {"schema": {"type": "string"}},
            },
            "description": "The edited image, with /v1/generate's headers (X-Seed, X-Backend, "
            "X-Quant-Type, X-Model, X-Width, X-Height, X-Steps: the steps that ran, timings). "
            "With stream: /v1/generate's events.",
        },
        **ERROR_RESPONSES,
    },
    response_class=Response,
    openapi_extra=_multipart(EditBytesRequest, _IMAGE_DOC),
    summary="Edit one image, returned as raw bytes",
)
async def edit_image(request: Request) -> Response:
    """`curl -o out.png -F image=@in.png -F mask=@mask.png -F prompt='a blue square'
    http://127.0.0.1:8000/v1/edit`"""
    qds: ServiceState = request.app.state.qds
    body, images = await _parse(request, EditBytesRequest)
    params = _params(body, images, n=1, width=body.width, height=body.height, size_field=None)
    if body.stream:
        return await stream_response(
            qds, request, params, "native", body.partial_images or 0, log_extra=_log_fields(images)
        )
    out = await qds.run(request, params)
    request.state.log_extra = {**out.log_fields(), **_log_fields(images)}
    return Response(
        content=out.images[0],
        media_type=CONTENT_TYPES[params.output_format],
        headers=native_headers(out),
    )
