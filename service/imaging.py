"""Image encoding (Pillow). Large results go through a thread: encoding must not block the loop."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


def encode(image: Image, fmt: str, compression: int | None = None) -> bytes:
    """png (lossless; compression ignored), jpeg / webp (compression = quality 0..100)."""
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: same pixels, 56 ms instead of 280 ms for a noisy 1024x1024 image (bench
        # overhead.md), files up to ~26% larger; generation latency matters more than bytes.
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        quality = 90 if compression is None else compression
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        quality = 90 if compression is None else compression
        image.save(buf, format="WEBP", quality=quality)
    else:  # validated before; a bug if reached
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def encode_all(images: list[Image], fmt: str, compression: int | None) -> list[bytes]:
    return [encode(img, fmt, compression) for img in images]
