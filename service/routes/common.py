"""The request path both generation endpoints share: validate, queue, run."""

from __future__ import annotations

from fastapi import Request

from quantization.generate import GenerationRequest
from service.engine import Outcome, ServiceState
from service.protocol import GenerateRequest, ImageGenerationRequest
from service.validation import check_common


async def run_generation(
    qds: ServiceState,
    request: Request,
    body: GenerateRequest | ImageGenerationRequest,
    *,
    width: int | None,
    height: int | None,
    n: int,
    size_param: str,
) -> tuple[Outcome, str]:
    """Validate the fields both protocols share, then run; returns the outcome and format."""
    fmt = body.output_format or "png"
    check_common(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.num_inference_steps,
        n=n,
        output_format=fmt,
        output_compression=body.output_compression,
        settings=qds.settings,
    )
    gen = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        width=width,
        height=height,
        num_images=n,
    )
    out = await qds.run(
        request,
        model=body.model,
        quant_backend=body.quant_backend,
        quant_type=body.quant_type,
        gen=gen,
        output_format=fmt,
        output_compression=body.output_compression,
        size_param=size_param,
    )
    return out, fmt
