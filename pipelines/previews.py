"""Cheap previews of latents: a linear latent -> RGB map fitted to the pipeline's own VAE.

A streamed partial image is a preview of the predicted clean latents at a step boundary. The
VAE decode that makes the final image is too dear for that on small denoisers: on the embedded
model one decode costs about 0.6 of a denoising step (docs/benchmarks/streaming.md), so two
previews would add ~10% to a 12-step request. Image UIs preview with a linear map from the
latent channels to RGB instead (ComfyUI's and SD.Next's "latent2rgb", with factors published
per model family). qdserve has no published factors for an arbitrary pipeline, so it fits
them to the VAE it serves, by least squares of RGB (averaged over each latent pixel's patch)
on the latent channels plus a bias, from real decodes: every final image of a request (free:
it is decoded anyway), and the first previews of a pipeline, which are real VAE decodes until
`MIN_PIXELS` latent pixels have been seen. After that a preview is one small matrix product
and a bilinear upsampling to the requested size (under a millisecond at 32x32): a blurred,
colour-faithful impression of where the image is going, not the final pixels.

Fitted to decodes rather than to the VAE's encoding of a colour palette: a VAE trained on one
domain (the embedded model's shapes) reconstructs random colour patches badly (mean error 103
of 255 measured), so its encoder says little about how its decoder renders real latents.
Measured on the embedded model, fitted on eight requests' final decodes: mean absolute error
12.6 of 255 against the real decode of three unseen requests' final latents (their flat mean
colour: 27.7; tests/integration/test_streaming_previews.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from pipelines.generate import GenerationRequest

# Latent pixels of real decodes before the linear map is trusted (17 unknowns per colour;
# one 1024x1024 Flux image has 16384, a 32x32 embedded-model image 256), and after which
# decodes are no longer learnt from.
MIN_PIXELS = 2048
MAX_PIXELS = 2**22
# Ridge on the normal equations, relative to their mean diagonal (keeps a near-constant
# channel from blowing the fit up).
RIDGE = 1e-4


class LatentRGB:
    """Least-squares fit of RGB in [-1, 1] on a latent's channels plus a bias."""

    def __init__(self, channels: int) -> None:
        import torch

        self.channels = channels
        # Ordinary tensors even when first made under the engine's inference_mode: they are
        # added to in place, which an inference tensor refuses outside that mode.
        with torch.inference_mode(False):
            self.xtx = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
            self.xty = torch.zeros(channels + 1, 3, dtype=torch.float64)
        self.pixels = 0
        self.weight: torch.Tensor | None = None  # (channels + 1, 3), the last row the bias

    @property
    def ready(self) -> bool:
        return self.weight is not None

    def observe(self, latents: torch.Tensor, images: torch.Tensor) -> None:
        """Add a decode: latents (B, C, h, w), its images (B, 3, H, W) in [-1, 1]."""
        import torch
        import torch.nn.functional as F

        _, c, h, w = latents.shape
        target = F.adaptive_avg_pool2d(images.double().cpu(), (h, w))
        x = latents.double().cpu().permute(0, 2, 3, 1).reshape(-1, c)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.pixels += len(x)
        if self.pixels >= MIN_PIXELS:
            eye = torch.eye(c + 1, dtype=torch.float64)
            ridge = RIDGE * float(self.xtx.diagonal().mean())
            self.weight = torch.linalg.solve(self.xtx + ridge * eye, self.xty).float()

    def apply(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images (B, 3, height, width) in [-1, 1] from latents (B, C, h, w)."""
        import torch
        import torch.nn.functional as F

        assert self.weight is not None
        weight = self.weight.to(latents.device)
        rgb = torch.einsum("bchw,cd->bdhw", latents.float(), weight[:-1])
        rgb = rgb + weight[-1].view(1, 3, 1, 1)
        rgb = F.interpolate(rgb, size=(height, width), mode="bilinear", align_corners=False)
        return rgb.clamp(-1.0, 1.0)


# One fit per VAE module (a pipeline's, shared by every batch on it); gone with the pipeline.
_FITS: weakref.WeakKeyDictionary[Any, LatentRGB] = weakref.WeakKeyDictionary()
_OBSERVE = threading.Lock()


def _fit(pipe: Any, channels: int) -> LatentRGB:
    fit = _FITS.get(pipe.vae)
    if fit is None or fit.channels != channels:
        fit = _FITS[pipe.vae] = LatentRGB(channels)
    return fit


def _unpack(pipe: Any, packed: torch.Tensor, req: GenerationRequest) -> torch.Tensor:
    return pipe._unpack_latents(
        packed, int(req.height or 0), int(req.width or 0), pipe.vae_scale_factor
    )


def observe_decode(
    pipe: Any, packed: torch.Tensor, req: GenerationRequest, images: list[Image]
) -> None:
    """Learn from a real decode of Flux's packed latents (the final image of a request costs
    nothing more); stops learning after `MAX_PIXELS` latent pixels."""
    import numpy as np
    import torch

    latents = _unpack(pipe, packed, req)
    # Batches on two engine lanes (engine.lanes) may finish at once: one fit, one writer.
    with _OBSERVE:
        fit = _fit(pipe, latents.shape[1])
        if fit.pixels >= MAX_PIXELS:
            return
        pixels = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
        fit.observe(latents, torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0)


def flux_preview(
    pipe: Any,
    packed: torch.Tensor,
    req: GenerationRequest,
    decode: Callable[[torch.Tensor, GenerationRequest], list[Image]],
) -> list[Image]:
    """Preview images of Flux's packed latents (B, tokens, C * 4) at `req`'s size: a real
    `decode` (learnt from) until the pipeline's fit is ready, the linear map after."""
    latents = _unpack(pipe, packed, req)
    fit = _fit(pipe, latents.shape[1])
    if not fit.ready:
        images = decode(packed, req)
        observe_decode(pipe, packed, req, images)
        return images
    rgb = fit.apply(latents, int(req.height or 0), int(req.width or 0))
    return list(pipe.image_processor.postprocess(rgb, output_type="pil"))
