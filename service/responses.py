"""Outcome -> the response bodies and final stream events of the generation endpoints.

One place builds `usage` (OpenAI's token shape, counted by the engine) and `timings`
(qdserve's extension), so the JSON response and the stream events cannot drift apart.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING

from service.protocol import (
    CompletedEvent,
    ImageData,
    ImagesResponse,
    ImagesUsage,
    Timings,
)

if TYPE_CHECKING:
    from service.outputs import Outcome


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def timings(out: Outcome) -> Timings:
    return Timings(
        queue_seconds=round(out.queue_seconds, 6),
        inference_seconds=round(out.inference_seconds, 6),
        encode_seconds=round(out.encode_seconds, 6),
        batch_images=out.batch_images,
    )


def usage(out: Outcome) -> ImagesUsage | None:
    return ImagesUsage.of(out.usage) if out.usage is not None else None


def images_response(out: Outcome, output_format: str, model_id: str) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=b64(img), seed=seed)
            for img, seed in zip(out.images, out.seeds, strict=True)
        ],
        output_format=output_format,  # type: ignore[arg-type]
        size=f"{out.width}x{out.height}",
        usage=usage(out),
        model=model_id,
        backend=out.key.backend,
        quant_type=out.key.quant_type,
        timings=timings(out),
    )


def native_completed(out: Outcome, output_format: str, model_id: str) -> CompletedEvent:
    u = usage(out)
    if u is None:
        raise RuntimeError("the engine returned no token usage for a streamed request")
    return CompletedEvent(
        b64_json=b64(out.images[0]),
        output_format=output_format,  # type: ignore[arg-type]
        seed=out.seeds[0],
        width=out.width,
        height=out.height,
        steps=out.steps,
        model=model_id,
        backend=out.key.backend,
        quant_type=out.key.quant_type,
        usage=u,
        timings=timings(out),
    )


def native_headers(out: Outcome) -> dict[str, str]:
    """The native endpoints' headers (/v1/generate and /v1/edit: curl scripts read both alike)."""
    ms = {
        "queue": out.queue_seconds,
        "inference": out.inference_seconds,
        "encode": out.encode_seconds,
    }
    return {
        "X-Seed": str(out.seeds[0]),
        "X-Model": out.key.model,
        "X-Backend": out.key.backend,
        "X-Quant-Type": out.key.quant_type or "",
        "X-Width": str(out.width),
        "X-Height": str(out.height),
        "X-Steps": str(out.steps),
        "X-Queue-Seconds": f"{out.queue_seconds:.6f}",
        "X-Inference-Seconds": f"{out.inference_seconds:.6f}",
        "X-Encode-Seconds": f"{out.encode_seconds:.6f}",
        "X-Batch-Images": str(out.batch_images),
        "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in ms.items()),
    }
