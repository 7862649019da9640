"""Partial-image previews (pipelines.previews): the least-squares latent -> RGB fit, the
switch from real decodes to the fitted map, and the map's fidelity on the demo model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pipelines import previews
from pipelines.generate import GenerationRequest, resolve
from pipelines.previews import LatentRGB


def test_fit_recovers_a_linear_map_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=gen) * 0.3  # 4 channels + bias
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    rgb = torch.einsum("bchw,cd->bdhw", latents, weight[:-1]) + weight[-1].view(1, 3, 1, 1)
    # Images at 2x the latent size, constant over each latent pixel's patch.
    images = rgb.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    fit = LatentRGB(4)
    assert not fit.ready
    for _ in range(previews.MIN_PIXELS // 128):  # 128 latent pixels per observation
        fit.observe(latents, images)
    assert fit.ready and fit.weight is not None
    assert torch.allclose(fit.weight, weight, atol=1e-3)
    out = fit.apply(latents, 16, 16)
    assert out.shape == (2, 3, 16, 16) and float(out.abs().max()) <= 1.0


@pytest.fixture(scope="module")
def demo() -> Iterator[Any]:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    loaded = load_pipeline(QuantSettings())  # the shipped demo weights: real images
    yield loaded
    loaded.release()


def _final_latents(loaded: Any, prompts: list[str], seed: int) -> tuple[list[Any], dict]:
    """Run the prompts as one step batch (3 steps); their requests and final packed latents."""
    from pipelines.stepping import StepBatch

    batch = StepBatch(loaded, max_images=len(prompts))
    reqs = [
        resolve(
            loaded.defaults,
            GenerationRequest(p, seed=seed + i, width=32, height=32, num_inference_steps=3),
        )
        for i, p in enumerate(prompts)
    ]
    for i, req in enumerate(reqs):
        batch.add(str(i), req)
    latents: dict[str, Any] = {}
    results: dict[str, Any] = {}
    while len(batch):
        for job_id in batch.job_ids():
            latents[job_id] = batch._jobs[job_id]  # the job object; its last latents stay on it
        results.update(dict(batch.step()))
    return reqs, {k: (latents[k].latents, results[k].images) for k in results}


def test_previews_decode_until_fitted_then_use_the_map(demo: Any) -> None:
    pipe = demo.pipeline
    previews._FITS.pop(pipe.vae, None)
    decodes: list[int] = []

    def decode(packed: Any, req: Any) -> list[Any]:
        decodes.append(len(packed))
        return [previews_image(req)]

    def previews_image(req: Any) -> Any:
        from PIL import Image

        return Image.new("RGB", (req.width, req.height), (200, 30, 30))

    req = GenerationRequest("x", width=32, height=32, num_images=1)
    packed = torch.randn(1, 64, 64)  # 32x32 on the 2x VAE: 8x8 tokens of 4 x 16 channels
    needed = previews.MIN_PIXELS // 256  # 256 latent pixels per 32x32 image
    for _ in range(needed):
        (img,) = previews.flux_preview(pipe, packed, req, decode)
        assert img.size == (32, 32)
    assert len(decodes) == needed
    (img,) = previews.flux_preview(pipe, packed, req, decode)
    assert len(decodes) == needed  # the map now, no decode
    # Fitted to flat red: the map renders red.
    r, g, b = np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 80 and b < 80
    previews._FITS.pop(pipe.vae, None)


def test_map_fitted_on_some_requests_previews_others_faithfully(demo: Any) -> None:
    """Fitted on eight requests' final decodes, the map's rendering of three other requests'
    final latents is within 20/255 of their real images on average, and closer than a flat
    mean colour (measured: see the docstring of pipelines.previews)."""
    pipe = demo.pipeline
    previews._FITS.pop(pipe.vae, None)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray"]
    colours += ["blue", "red"]
    shapes = ["circle", "square", "triangle", "star"]
    prompts = [f"a {c} {shapes[i % 4]}" for i, c in enumerate(colours)]
    train = previews.MIN_PIXELS // 256  # 256 latent pixels per 32x32 image
    assert train == 8
    with torch.no_grad():
        reqs, finals = _final_latents(demo, prompts, seed=300)
    # StepBatch already learnt from these final decodes: start again from this split only.
    previews._FITS.pop(pipe.vae, None)
    for i in range(train):
        packed, images = finals[str(i)]
        previews.observe_decode(pipe, packed, reqs[i], images)
    errors, flat = [], []
    for i in range(train, len(prompts)):
        packed, images = finals[str(i)]
        real = np.asarray(images[0], dtype=np.float32)
        (mapped,) = previews.flux_preview(pipe, packed, reqs[i], _no_decode)
        errors.append(np.abs(np.asarray(mapped, dtype=np.float32) - real).mean())
        flat.append(np.abs(real - real.mean(axis=(0, 1))).mean())
    previews._FITS.pop(pipe.vae, None)
    assert float(np.mean(errors)) < 20, errors
    assert float(np.mean(errors)) < float(np.mean(flat)), (errors, flat)


def _no_decode(packed: Any, req: Any) -> list[Any]:
    raise AssertionError("the fitted map should have been used")
