"""Request / response schemas: OpenAI's Images API shapes plus qdserve's extension fields.

Pydantic checks types and every rule that does not depend on configuration (enums, ranges,
the size pattern), so the OpenAPI schema states them; the limits that do (QDS_MAX_PIXELS,
QDS_MAX_STEPS, QDS_MAX_IMAGES, QDS_MAX_PROMPT_CHARS, the model's size multiple) are checked
by the one resolve step in `service.processor`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.lora import DEFAULT_SCALE as LORA_DEFAULT_SCALE
from pipelines.lora import MAX_SCALE as LORA_MAX_SCALE
from pipelines.lora import MIN_SCALE as LORA_MIN_SCALE
from pipelines.lora import NAME_PATTERN as LORA_NAME_PATTERN
from pipelines.step_cache import canonical as step_cache_canonical
from pipelines.token_usage import TokenUsage
from quantization.backends import BACKENDS

OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[OutputFormat, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
# The registry's keys, so the schema lists the backends this build knows (dynamic on purpose:
# adding a backend file adds it here).
QuantBackend = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]

# Hard caps that hold whatever the configuration says; the configured limits (QDS_MAX_*)
# are checked by the resolve step and can only be lower.
MAX_IMAGES = 10  # OpenAI's own limit for n
MAX_STEPS = 1000
MAX_SIDE = 16384
MAX_SEED = 2**63 - 1
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit for partial_images
MAX_LORAS = 16  # adapters in one request (each must also be declared in QDS_LORAS)
# "WxH" with positive sides of at most five digits, or "auto".
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
# Longest free-text field accepted by the schema; QDS_MAX_PROMPT_CHARS is the real limit.
_MAX_TEXT = 1_000_000

# Error codes and hints for schema errors on particular fields, so a pydantic error keeps the
# code clients already match on (service.errors uses these).
FIELD_ERROR_CODES: dict[str, str] = {
    "size": "invalid_size",
    "width": "invalid_size",
    "height": "invalid_size",
    "response_format": "unsupported_response_format",
}
FIELD_HINTS: dict[str, str] = {
    "size": '"WxH" (e.g. "512x512") or "auto"',
    "response_format": "only b64_json is supported (url would need an image store)",
}


# Field types the four request models share, defined once (a model may still replace the
# description with `= Field(description=...)`; pydantic merges the two).
Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=_MAX_TEXT,
        description="Text prompt (QDS_MAX_PROMPT_CHARS characters at most).",
    ),
]
ModelId = Annotated[
    str | None, Field(max_length=1024, description="A model id from GET /v1/models.")
]
ImageCount = Annotated[
    int, Field(ge=1, le=MAX_IMAGES, description="Images to generate (1..QDS_MAX_IMAGES).")
]
B64Only = Annotated[
    Literal["b64_json"] | None,
    Field(description="Only b64_json is supported (no url responses)."),
]
# OpenAI fields qdserve ignores stay free-form strings: OpenAI keeps adding values to them
# (quality gained xhigh and max), and refusing a field we ignore would only break clients.
Ignored = Annotated[str | None, Field(description="Accepted and ignored (OpenAI field).")]
EndUser = Annotated[
    str | None, Field(max_length=256, description="End-user id; logged, never a label.")
]
Side = Annotated[int | None, Field(ge=1, le=MAX_SIDE)]
_EDIT_PROMPT = "What the edited image should show (QDS_MAX_PROMPT_CHARS characters at most)."


class LoraRef(BaseModel):
    """One adapter of a request's `lora` list: a name declared in QDS_LORAS and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=LORA_NAME_PATTERN.pattern,
        description="An adapter declared in QDS_LORAS (GET /v1/models lists them).",
    )
    scale: float = Field(
        default=LORA_DEFAULT_SCALE,
        ge=LORA_MIN_SCALE,
        le=LORA_MAX_SCALE,
        description=f"Strength, {LORA_MIN_SCALE}..{LORA_MAX_SCALE}; 0 leaves it out.",
    )


class _Common(BaseModel):
    """Fields both endpoints share: OpenAI's output fields and qdserve's extensions (the
    openai client sends the extensions via extra_body)."""

    negative_prompt: str | None = Field(
        default=None,
        max_length=_MAX_TEXT,
        description="What the image should avoid (QDS_MAX_PROMPT_CHARS characters at most).",
    )
    num_inference_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Denoising steps (at most QDS_MAX_STEPS); QDS_DEFAULT_STEPS or the model's "
        "default if omitted.",
    )
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Guidance; the model's default if omitted."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Request seed; image i uses seed + i. Random (and returned) if omitted.",
    )
    quant_backend: QuantBackend | None = Field(
        default=None, description="Serve from this quantization backend's cache entry."
    )
    quant_type: str | None = Field(
        default=None, max_length=64, description="Backend quant type, e.g. int8."
    )
    output_format: OutputFormat | None = Field(default="png", description="png, jpeg or webp.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="Quality for jpeg and webp (ignored for png)."
    )
    stream: bool | None = Field(
        default=False,
        description="Answer with server-sent events: OpenAI's image_generation.* events on "
        "/v1/images/generations, progress events on /v1/generate.",
    )
    partial_images: int | None = Field(
        default=0,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="Partial images to stream before the final one (0-3; with stream only). "
        "Previews of the latents at evenly spread step boundaries; fewer when a request has "
        "too few steps or its pipeline cannot preview.",
    )
    step_cache: str | None = Field(
        default=None,
        max_length=64,
        description="Extension: step caching for this call: `off`, `fbcache:<threshold>` "
        "(0..1, e.g. `fbcache:0.2`) or `taylorseer:<interval>` (1..10, e.g. `taylorseer:6`); "
        "QDS_STEP_CACHE (GET /v1/models shows it) if omitted. Faster, and further from the "
        "uncached image the higher the threshold or interval.",
    )
    lora: list[LoraRef] | None = Field(
        default=None,
        max_length=MAX_LORAS,
        description="LoRA adapters to apply, each declared in QDS_LORAS, with a scale; none: "
        "the base model (bit-exact). Requests batch only with the same adapters and scales.",
    )

    @field_validator("step_cache")
    @classmethod
    def _step_cache(cls, value: str | None) -> str | None:
        return None if value is None else step_cache_canonical(value)


class ImageGenerationRequest(_Common):
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

    prompt: Prompt
    model: ModelId = Field(
        default=None, description="A model id from GET /v1/models; the default if omitted."
    )
    n: ImageCount = 1
    size: str | None = Field(
        default=None,
        pattern=SIZE_PATTERN,
        description='"WxH" (e.g. "512x512") or "auto" for the model default; at most '
        "QDS_MAX_PIXELS pixels, each side a multiple of the model's size multiple.",
    )
    response_format: B64Only = "b64_json"
    quality: Ignored = None
    style: Ignored = None
    background: Ignored = None
    moderation: Ignored = None
    user: EndUser = None


class GenerateRequest(_Common):
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

    prompt: Prompt
    model: ModelId = None
    width: Side = Field(default=None, description="Pixels; the model's default if omitted.")
    height: Side = Field(default=None, description="Pixels; the model's default if omitted.")


# -- image edits (multipart/form-data: these are the text fields; files are parsed apart) ---
class _EditFields(BaseModel):
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Extension: how far the input is noised before denoising (diffusers' "
        "strength; steps run = steps - int(steps * (1 - strength))). Default 0.6 without a "
        "mask (img2img), 1.0 with one (the masked area is repainted).",
    )


class ImageEditRequest(_EditFields, _Common):
    """`POST /v1/images/edits`: OpenAI's text fields plus the extensions. The files are
    `image` (or `image[]`; one image) and optionally `mask` (its alpha-0 pixels are edited)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = Field(description=_EDIT_PROMPT)
    model: ModelId = None
    n: ImageCount = 1
    size: str | None = Field(
        default=None,
        pattern=SIZE_PATTERN,
        description='"WxH" (the image and mask are resized to it), or "auto" / omitted: the '
        "input image's size, scaled down to fit QDS_MAX_PIXELS and rounded down to the "
        "model's size multiple.",
    )
    response_format: B64Only = "b64_json"
    quality: Ignored = None
    background: Ignored = None
    input_fidelity: Ignored = None
    user: EndUser = None


class EditBytesRequest(_EditFields, _Common):
    """`POST /v1/edit` (multipart): one edited image, returned as raw bytes."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(description=_EDIT_PROMPT)
    model: ModelId = None
    width: Side = Field(default=None, description="Pixels; the input's (see size) if omitted.")
    height: Side = Field(default=None, description="Pixels; the input's (see size) if omitted.")


class ImageData(BaseModel):
    """OpenAI's `Image` (b64_json only) plus `seed`, qdserve's extension."""

    b64_json: str
    # Absent, never null, when there is none: OpenAI's schema types it as a string.
    revised_prompt: str | None = Field(default=None, description="Never set by qdserve.")
    seed: int = Field(description="Extension: the seed that reproduces this image alone.")


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(description="Prompt (and negative prompt) tokens.")
    image_tokens: int = Field(description="Latent patches of the input images (edits).")


class OutputTokensDetails(BaseModel):
    image_tokens: int = Field(description="Latent patches of the generated images.")
    text_tokens: int = Field(default=0, description="Always 0: no text is generated.")


class ImagesUsage(BaseModel):
    """OpenAI's `ImageGenUsage` / `ImagesUsage` with real counts from the serving pipeline:
    prompt tokens from its sequence tokenizer (T5 for Flux) and image tokens as the
    denoiser's latent patches (pipelines.token_usage says how)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails

    @classmethod
    def of(cls, usage: TokenUsage) -> ImagesUsage:
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(
                text_tokens=usage.text_tokens, image_tokens=usage.image_tokens
            ),
            output_tokens_details=OutputTokensDetails(image_tokens=usage.output_tokens),
        )


class Timings(BaseModel):
    """Extension: where the request's time went (seconds), and the batch it ran in."""

    queue_seconds: float
    inference_seconds: float
    encode_seconds: float
    batch_images: int = Field(description="Images in the step batch when the request finished.")


class ImagesResponse(BaseModel):
    """OpenAI's `ImagesResponse`; `size` may be any served `WxH` (OpenAI enumerates three)."""

    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    # Absent only where the engine ran a stand-in that counts nothing (tests).
    usage: ImagesUsage | None = None
    # Extensions: which cache entry served the request, and its timings.
    model: str
    backend: str
    quant_type: str | None = None
    timings: Timings


# -- stream events (server-sent events; OpenAI's ImageGen*/ImageEdit* event schemas) --------
class _ImageEvent(BaseModel):
    b64_json: str
    created_at: int
    size: str
    # qdserve takes OpenAI's quality and background and ignores them: "auto" says so.
    quality: Literal["auto"] = "auto"
    background: Literal["auto"] = "auto"
    output_format: OutputFormat
    # Extensions: which image of the request (n > 1) and the seed that reproduces it.
    index: int = Field(description="Extension: the image's position in the request (0..n-1).")
    seed: int


class _PartialImageEvent(_ImageEvent):
    partial_image_index: int = Field(description="0-based index of this partial image.")
    # Extension: after which denoising step the preview was taken.
    step: int
    total_steps: int


class _CompletedEvent(_ImageEvent):
    usage: ImagesUsage = Field(description="The whole request's usage (on each image's event).")
    model: str
    backend: str
    quant_type: str | None = None
    timings: Timings


class ImageGenPartialImageEvent(_PartialImageEvent):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"


class ImageGenCompletedEvent(_CompletedEvent):
    type: Literal["image_generation.completed"] = "image_generation.completed"


class ImageEditPartialImageEvent(_PartialImageEvent):
    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"


class ImageEditCompletedEvent(_CompletedEvent):
    type: Literal["image_edit.completed"] = "image_edit.completed"


# The event classes of each OpenAI endpoint: (partial image, completed).
GENERATION_EVENTS = (ImageGenPartialImageEvent, ImageGenCompletedEvent)
EDIT_EVENTS = (ImageEditPartialImageEvent, ImageEditCompletedEvent)


class ProgressEvent(BaseModel):
    """`POST /v1/generate` with stream: one after every denoising step of the request."""

    type: Literal["progress"] = "progress"
    step: int = Field(description="Steps done (1..total).")
    total: int


class PartialImageEvent(BaseModel):
    """`POST /v1/generate` with stream and partial_images: a preview of the latents."""

    type: Literal["partial_image"] = "partial_image"
    partial_image_index: int
    step: int
    total: int
    b64_json: str
    output_format: OutputFormat


class CompletedEvent(BaseModel):
    """`POST /v1/generate` with stream: the last event, carrying the image."""

    type: Literal["completed"] = "completed"
    b64_json: str
    output_format: OutputFormat
    seed: int
    width: int
    height: int
    steps: int
    model: str
    backend: str
    quant_type: str | None = None
    usage: ImagesUsage
    timings: Timings


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
    # The QDS_LORAS adapters: name, source, and for a loaded variant rank, bytes and state.
    loras: list[dict[str, Any]] = Field(default_factory=list)
    # QDS_QUANT_BACKEND=auto: the plan this variant was loaded by (backend and type per
    # component, bytes, budget, priority); absent otherwise.
    plan: dict[str, Any] | None = None
    # QDS_STEP_CACHE: the step caching requests get when they name none.
    step_cache: str = "off"


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
        413: "Request body over QDS_MAX_BODY_BYTES (QDS_MAX_UPLOAD_BYTES for multipart).",
        429: "Queue full; retry after the Retry-After header.",
        500: "Internal error; the body carries the request id found in the logs.",
        503: "Not ready, shutting down, model load failed, or out of memory.",
        504: "Request timed out (QDS_REQUEST_TIMEOUT).",
    }.items()
}
