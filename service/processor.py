"""The processor: a validated body (generation or edit, JSON or multipart) becomes a complete,
immutable `JobSpec` once, in the HTTP process. The engine takes it as final.

    body -> ImageParams.from_body / .of        (routes: what the client sent, any endpoint)
         -> Processor.process:
              check_limits                     (settings only: before any model is touched)
              Variants.select                  (which cache entry; 404/400 on a bad id)
              the variant's defaults           (published by the engine once, when it loaded;
                                                a round trip only for a variant still loading)
              resolve                          (size, steps, guidance, seed, strength filled)
              check_lora_variant, preview_steps
              (and the queue's room for this client: the 429 before any wait)
         -> JobSpec                             (submitted as it is; nothing below fills it)

Rules that hold whatever the configuration are in the pydantic protocol (so the OpenAPI
schema states them); this module holds the ones that depend on `ServiceSettings` or on the
loaded model. Every failure is an `InvalidValue` naming the request field at fault.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from engine.failures import ModelNotLoaded, ShuttingDown
from pipelines import edit
from pipelines.generate import GenerationRequest
from pipelines.generate import resolve as fill_defaults
from pipelines.lora import normalize_selection
from pipelines.seeds import image_seeds
from service.exceptions import InvalidValue, RequestTimeout
from service.protocol import (
    MAX_PARTIAL_IMAGES,
    GenerateRequest,
    ImageGenerationRequest,
    LoraRef,
    OutputFormat,
)

if TYPE_CHECKING:
    from engine.client import EngineClient
    from engine.keys import ModelKey
    from pipelines.loader import ModelDefaults
    from quantization.settings import QuantSettings
    from service.settings import ServiceSettings
    from service.uploads import EditImages
    from service.variants import Variants


@dataclass(frozen=True)
class ImageParams:
    """A generation request as the engine sees it, whichever endpoint it came through."""

    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    model: str | None = None
    quant_backend: str | None = None
    quant_type: str | None = None
    # The request field that carried the size: "size" (OpenAI) or None (width / height).
    size_field: str | None = None
    # Image edits (service.routes.edits): the decoded uploads and the strength; None for a
    # generation. The resolve step then returns a `pipelines.edit.EditRequest`.
    edit: EditImages | None = None
    strength: float | None = None
    # The request's `lora` list as (name, scale) pairs, in request order (checked and
    # normalized by `check_limits` / `generation`).
    lora: tuple[tuple[str, float], ...] = ()
    # The request's `step_cache` (canonical), None: QDS_STEP_CACHE.
    step_cache: str | None = None

    @classmethod
    def from_body(cls, body: ImageGenerationRequest | GenerateRequest) -> ImageParams:
        if isinstance(body, ImageGenerationRequest):
            width, height = parse_size(body.size)
            return cls.of(body, n=body.n, width=width, height=height, size_field="size")
        return cls.of(body, n=1, width=body.width, height=body.height, size_field=None)

    @classmethod
    def of(
        cls,
        body: Any,
        *,
        n: int,
        width: int | None,
        height: int | None,
        size_field: str | None,
        **extra: Any,
    ) -> ImageParams:
        """The fields every image request body shares (generations and edits, OpenAI and
        native), plus the route's own (`extra`: an edit's images and strength)."""
        return cls(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            n=n,
            width=width,
            height=height,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            output_format=body.output_format or "png",
            output_compression=body.output_compression,
            model=body.model,
            quant_backend=body.quant_backend,
            quant_type=body.quant_type,
            size_field=size_field,
            lora=lora_pairs(body.lora),
            step_cache=getattr(body, "step_cache", None),
            **extra,
        )

    def size_param(self, side: str) -> str:
        """The field to blame for a size problem on `side` ("width" or "height")."""
        return self.size_field or side

    def generation(self) -> GenerationRequest:
        """The request as given, model defaults not yet filled in."""
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            width=self.width,
            height=self.height,
            num_images=self.n,
            lora=normalize_selection(self.lora),
        )


def lora_pairs(refs: list[LoraRef] | None) -> tuple[tuple[str, float], ...]:
    """The protocol's `lora` list as (name, scale) pairs."""
    return tuple((ref.name, ref.scale) for ref in refs or ())


def check_lora(params: ImageParams, settings: ServiceSettings) -> None:
    """Every requested adapter is declared in QDS_LORAS, and named once."""
    if not params.lora:
        return
    declared = settings.lora_names
    names = [name for name, _ in params.lora]
    unknown = [n for n in names if n not in declared]
    if unknown:
        listing = ", ".join(declared) if declared else "none (the server sets QDS_LORAS)"
        raise InvalidValue(
            f"unknown LoRA adapter {unknown[0]!r}; declared: {listing}",
            param="lora",
            code="invalid_lora",
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidValue(
            f"LoRA adapter {repeated[0]!r} is listed more than once; give it one scale",
            param="lora",
            code="invalid_lora",
        )


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None / 'auto' -> (None, None) = the model's default size.

    The protocol's pattern has already refused anything else.
    """
    if size is None or size == "auto":
        return None, None
    width, _, height = size.partition("x")
    return int(width), int(height)


def check_limits(params: ImageParams, settings: ServiceSettings) -> None:
    """The configured limits that need no model: cheap, so the processor checks them before
    it picks (and perhaps loads) a model."""
    if not params.prompt.strip():
        raise InvalidValue("prompt must not be empty", param="prompt")
    limit = settings.max_prompt_chars
    for name, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
        if text is not None and len(text) > limit:
            raise InvalidValue(
                f"{name} has {len(text)} characters; the limit is QDS_MAX_PROMPT_CHARS={limit}",
                param=name,
                code="prompt_too_long",
            )
    steps = params.num_inference_steps
    if steps is not None and steps > settings.max_steps:
        raise InvalidValue(
            f"num_inference_steps must be 1..{settings.max_steps} (QDS_MAX_STEPS); got {steps}",
            param="num_inference_steps",
        )
    if params.n > settings.max_images:
        raise InvalidValue(
            f"n must be 1..{settings.max_images} (QDS_MAX_IMAGES); got {params.n}", param="n"
        )
    if params.width is not None and params.height is not None:
        _check_pixels(params, params.width, params.height, settings.max_pixels)
    check_lora(params, settings)


def check_lora_variant(variant_id: str, entry: Any) -> None:
    """A request naming adapters must land on a variant that has them: one whose backend
    could not take them (its `Loaded.lora_error`) is a 400 with that reason."""
    error = getattr(entry, "lora_error", "")
    if error:
        raise InvalidValue(f"{variant_id}: {error}", param="lora", code="lora_unsupported")


def _check_pixels(params: ImageParams, width: int, height: int, max_pixels: int) -> None:
    if width * height <= max_pixels:
        return
    given = params.width is not None and params.height is not None
    if given:
        what = f"{width}x{height} = {width * height} pixels"
    elif params.width is None and params.height is None:
        what = f"the model's default size {width}x{height}"
    else:
        what = f"{width}x{height} (the side not given is the model's default)"
    raise InvalidValue(
        f"{what} exceeds QDS_MAX_PIXELS={max_pixels}" + ("" if given else "; give a smaller size"),
        param=params.size_param("width"),
        code="size_too_large",
    )


def resolve(
    params: ImageParams, settings: ServiceSettings, defaults: ModelDefaults
) -> GenerationRequest:
    """The final request the engine queues and the batch key is computed from (the limits
    that need no model were checked before: `check_limits`)."""
    if params.edit is not None:
        params = _edit_size(params, settings, defaults)
    gen = fill_defaults(defaults, params.generation(), default_steps=settings.default_steps)
    gen = replace(gen, step_cache=params.step_cache or settings.step_cache)
    width, height = int(gen.width or 0), int(gen.height or 0)
    multiple = defaults.size_multiple
    for value, side in ((width, "width"), (height, "height")):
        if value % multiple:
            raise InvalidValue(
                f"{side} {value} is not a multiple of {multiple}, which this model needs",
                param=params.size_param(side),
                code="invalid_size",
            )
    _check_pixels(params, width, height, settings.max_pixels)
    if params.edit is not None:
        request = edit.EditRequest(
            **{f.name: getattr(gen, f.name) for f in fields(gen)},
            image=params.edit.image,
            mask=params.edit.mask,
            strength=params.strength,
        )
        # Fills the kind's default strength; everything else is already resolved.
        return edit.resolve(defaults, request)
    return gen


def _edit_size(
    params: ImageParams, settings: ServiceSettings, defaults: ModelDefaults
) -> ImageParams:
    """An edit's output size when the request leaves it (or one side) open: the input's,
    scaled to fit QDS_MAX_PIXELS (`edit.auto_size`), a lone side completed by the input's
    aspect ratio; never the model's default size."""
    assert params.edit is not None
    in_w, in_h = params.edit.input_size
    multiple = defaults.size_multiple
    width, height = params.width, params.height
    if width is None and height is None:
        width, height = edit.auto_size((in_w, in_h), multiple, settings.max_pixels)
    elif height is None:
        height = max(multiple, round(width * in_h / in_w) // multiple * multiple)
    elif width is None:
        width = max(multiple, round(height * in_w / in_h) // multiple * multiple)
    return replace(params, width=width, height=height)


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The steps after which to preview: `partial_images` evenly spread strictly inside the
    run (after step round(N * (i + 1) / (k + 1)), i = 0..k-1), fewer when N is too small to
    give distinct steps (OpenAI allows the final image to come before every partial)."""
    k = max(0, min(int(partial_images), MAX_PARTIAL_IMAGES))
    n = int(total_steps)
    steps = {round(n * (i + 1) / (k + 1)) for i in range(k)}
    return tuple(sorted(s for s in steps if 1 <= s < n))


@dataclass(frozen=True)
class JobSpec:
    """A request resolved once: the variant that runs it, the final request (every default
    filled), how its answer is rendered, its stream options and its deadline."""

    key: ModelKey
    variant: QuantSettings
    request: GenerationRequest  # final; an `edit.EditRequest` for edits
    allow_load: bool
    output_format: OutputFormat
    output_compression: int | None
    previews: tuple[int, ...]  # steps after which a streamed request gets a partial image
    deadline: float  # time.monotonic() by which it must be answered
    owner: str = ""  # who sent it (an API key's position): fair admission across keys

    @property
    def seeds(self) -> list[int]:
        return image_seeds(int(self.request.seed or 0), self.request.num_images)


class Processor:
    """Turns `ImageParams` into a `JobSpec` (the module docstring lists the steps)."""

    def __init__(self, settings: ServiceSettings, variants: Variants, engine: EngineClient):
        self.settings = settings
        self.variants = variants
        self.engine = engine

    async def process(
        self, params: ImageParams, *, owner: str = "", partial_images: int = 0
    ) -> JobSpec:
        deadline = time.monotonic() + self.settings.request_timeout
        check_limits(params, self.settings)
        key, variant = self.variants.select(params.model, params.quant_backend, params.quant_type)
        models = self.engine.models
        allowed = (
            key == self.variants.default_key
            or self.settings.allow_on_demand_load
            or models.is_loaded(key)
            or models.is_loading(key)
        )
        if not allowed:
            raise self.not_loaded(key)
        if not self.engine.accepting:
            raise ShuttingDown()
        # Refused (429) before a model load is waited for (and, for edits, before the upload
        # is decoded: routes.edits checks the same room itself first).
        self.engine.check_room(owner)
        try:
            defaults = await asyncio.wait_for(
                self.engine.ensure_loaded(key, variant, allow_load=allowed),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            raise timeout_error(
                self.settings.request_timeout, "waiting for the model to load"
            ) from None
        except LookupError:
            raise self.not_loaded(key) from None
        request = resolve(params, self.settings, defaults)
        if request.lora:
            check_lora_variant(key.variant_id, self.engine.loaded.get(key))
        return JobSpec(
            key=key,
            variant=variant,
            request=request,
            allow_load=allowed,
            output_format=params.output_format,
            output_compression=params.output_compression,
            previews=preview_steps(int(request.num_inference_steps or 0), partial_images),
            deadline=deadline,
            owner=owner,
        )

    def not_loaded(self, key: ModelKey) -> ModelNotLoaded:
        loaded = ", ".join(k.variant_id for k in self.engine.models.loaded_keys()) or "none"
        return ModelNotLoaded(
            f"{key.variant_id} is not loaded and on-demand loading is off "
            f"(QDS_ALLOW_ON_DEMAND_LOAD); loaded: {loaded}",
            param="quant_backend",
        )


def timeout_error(limit: float, where: str) -> RequestTimeout:
    return RequestTimeout(f"request timed out after {limit:g}s (QDS_REQUEST_TIMEOUT) {where}")
