"""Request / response schemas: OpenAI's Images API shapes plus qdserve's extension fields.

Pydantic checks types and the limits that do not depend on configuration; the limits that do
(max pixels, steps, images, prompt length, the model's size multiple) are checked in
`service.validation`, because they come from `ServiceSettings` and the loaded model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class _Extensions(BaseModel):
    """Fields qdserve adds to OpenAI's request (the openai client sends them via extra_body)."""

    negative_prompt: str | None = Field(default=None, description="What the image should avoid.")
    num_inference_steps: int | None = Field(
        default=None, description="Denoising steps; QDS_DEFAULT_STEPS or the model's default."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Guidance; the model's default if omitted."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Request seed; image i uses seed + i. Random (and returned) if omitted.",
    )
    quant_backend: str | None = Field(
        default=None, description="Serve from this quantization backend's cache entry."
    )
    quant_type: str | None = Field(default=None, description="Backend quant type, e.g. int8.")


class ImageGenerationRequest(_Extensions):
    """`POST /v1/images/generations`: OpenAI's fields plus the extensions above."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "qdserve/embedded-flux",
                    "prompt": "a red circle on a blue square",
                    "n": 2,
                    "size": "32x32",
                    "response_format": "b64_json",
                    "seed": 42,
                }
            ]
        },
    )

    prompt: str = Field(description="Text prompt.")
    model: str | None = Field(
        default=None, description="A model id from GET /v1/models; the default if omitted."
    )
    n: int = Field(default=1, description="Images to generate (1..QDS_MAX_IMAGES).")
    size: str | None = Field(
        default=None, description='"WxH" (e.g. "512x512") or "auto" for the model default.'
    )
    response_format: str | None = Field(
        default="b64_json", description="Only b64_json is supported."
    )
    output_format: str | None = Field(default="png", description="png, jpeg or webp.")
    output_compression: int | None = Field(
        default=None, description="0..100, quality for jpeg and webp (ignored for png)."
    )
    quality: str | None = Field(default=None, description="Accepted and ignored (OpenAI field).")
    style: str | None = Field(default=None, description="Accepted and ignored (OpenAI field).")
    background: str | None = Field(default=None, description="Accepted and ignored.")
    moderation: str | None = Field(default=None, description="Accepted and ignored.")
    user: str | None = Field(default=None, description="End-user id; logged, never a label.")


class GenerateRequest(_Extensions):
    """`POST /v1/generate`: one image, returned as raw bytes."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red circle",
                    "width": 32,
                    "height": 32,
                    "seed": 7,
                    "output_format": "png",
                }
            ]
        },
    )

    prompt: str = Field(description="Text prompt.")
    model: str | None = Field(default=None, description="A model id from GET /v1/models.")
    width: int | None = Field(default=None, description="Pixels; the model's default if omitted.")
    height: int | None = Field(default=None, description="Pixels; the model's default if omitted.")
    output_format: str | None = Field(default="png", description="png, jpeg or webp.")
    output_compression: int | None = Field(default=None, description="0..100 (jpeg/webp).")


class ImageData(BaseModel):
    b64_json: str
    seed: int = Field(description="The seed that reproduces this image alone.")
    revised_prompt: str | None = None


class Usage(BaseModel):
    """Timings of the request (seconds); OpenAI's usage object is token based, ours is time."""

    queue_seconds: float
    inference_seconds: float
    encode_seconds: float
    batch_images: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    model: str
    backend: str
    quant_type: str | None
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qdserve"
    # Extensions: which cache entry this id selects and whether it is loaded.
    model: str
    backend: str
    quant_type: str | None
    compute_dtype: str
    loaded: bool
    default: bool
    storage_bytes: int | None = None
    in_use: int = 0


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=type, param=param, code=code, request_id=request_id)
    ).model_dump()


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Invalid request (the error's `param` names the field).",
        401: "Missing or wrong API key.",
        404: "Unknown model.",
        429: "Queue full; retry after the Retry-After header.",
        500: "Internal error; the body carries the request id found in the logs.",
        503: "Not ready, shutting down, model load failed, or out of memory.",
        504: "Request timed out (QDS_REQUEST_TIMEOUT).",
    }.items()
}
