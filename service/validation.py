"""Checks that depend on configuration or on the loaded model; each names the failing param."""

from __future__ import annotations

import re

from service.errors import APIError
from service.protocol import CONTENT_TYPES
from service.settings import ServiceSettings

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None / 'auto' -> (None, None) = the model's default size."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(size.strip().lower())
    if not match:
        raise APIError(
            400,
            f"size {size!r} is not WxH (e.g. 512x512) or auto",
            param="size",
            code="invalid_size",
        )
    return int(match.group(1)), int(match.group(2))


def check_dims(
    width: int | None, height: int | None, settings: ServiceSettings, param: str
) -> None:
    """Limits that do not need the model: positive, within QDS_MAX_PIXELS."""
    for value, name in ((width, "width"), (height, "height")):
        if value is not None and value <= 0:
            raise APIError(
                400,
                f"{name} must be positive",
                param=param if param == "size" else name,
                code="invalid_size",
            )
    if width is not None and height is not None and width * height > settings.max_pixels:
        raise APIError(
            400,
            f"{width}x{height} = {width * height} pixels exceeds QDS_MAX_PIXELS="
            f"{settings.max_pixels}",
            param=param if param == "size" else "width",
            code="size_too_large",
        )


def check_multiple(
    width: int, height: int, multiple: int, default_size: int, max_pixels: int, param: str
) -> None:
    """The model's needs: a multiple of its VAE x patch factor, and defaults within limits."""
    for value, name in ((width, "width"), (height, "height")):
        if value % multiple:
            raise APIError(
                400,
                f"{name} {value} is not a multiple of {multiple}, which this model needs",
                param=param if param == "size" else name,
                code="invalid_size",
            )
    if width * height > max_pixels:
        raise APIError(
            400,
            f"the model's default size {default_size}x{default_size} exceeds QDS_MAX_PIXELS="
            f"{max_pixels}; give a smaller size",
            param=param if param == "size" else "width",
            code="size_too_large",
        )


def check_common(
    *,
    prompt: str,
    negative_prompt: str | None,
    steps: int | None,
    n: int,
    output_format: str | None,
    output_compression: int | None,
    settings: ServiceSettings,
) -> None:
    if not prompt.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(
            400,
            f"prompt has {len(prompt)} characters; the limit is QDS_MAX_PROMPT_CHARS="
            f"{settings.max_prompt_chars}",
            param="prompt",
            code="prompt_too_long",
        )
    if negative_prompt is not None and len(negative_prompt) > settings.max_prompt_chars:
        raise APIError(
            400,
            f"negative_prompt exceeds QDS_MAX_PROMPT_CHARS={settings.max_prompt_chars}",
            param="negative_prompt",
            code="prompt_too_long",
        )
    if steps is not None and not 1 <= steps <= settings.max_steps:
        raise APIError(
            400,
            f"num_inference_steps must be 1..{settings.max_steps} (QDS_MAX_STEPS); got {steps}",
            param="num_inference_steps",
            code="invalid_value",
        )
    if not 1 <= n <= settings.max_images:
        raise APIError(
            400,
            f"n must be 1..{settings.max_images} (QDS_MAX_IMAGES); got {n}",
            param="n",
            code="invalid_value",
        )
    if (output_format or "png") not in CONTENT_TYPES:
        raise APIError(
            400,
            f"output_format {output_format!r} is not one of {', '.join(CONTENT_TYPES)}",
            param="output_format",
            code="invalid_value",
        )
    if output_compression is not None and not 0 <= output_compression <= 100:
        raise APIError(
            400,
            f"output_compression must be 0..100; got {output_compression}",
            param="output_compression",
            code="invalid_value",
        )
