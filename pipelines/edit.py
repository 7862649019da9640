"""Image edits on the pipeline already loaded: img2img without a mask, inpainting with one.

The edit pipelines are diffusers' own task classes (`AutoPipelineForImage2Image` /
`AutoPipelineForInpainting`: FluxImg2ImgPipeline / FluxInpaintPipeline for a Flux model),
built with `from_pipe` around the SAME module objects as the loaded text-to-image pipeline:
no weight is copied, whatever the backend (quantized modules are shared as they are).
`AutoPipeline*.from_pipe` rather than `FluxImg2ImgPipeline.from_pipe`: the latter ends with
`new_pipeline.to(dtype=torch.float32)` unless told otherwise, which would cast the shared
modules of a bf16 (or mixed-dtype) pipeline in place; the Auto classes do not cast.

Each derived pipeline gets its own scheduler copy (`set_timesteps` mutates a scheduler, and the
text-to-image path may hold its own state between steps) and is cached per loaded pipeline, in
a weak mapping: when the cache evicts and releases the text-to-image pipeline, its derived
pipelines go with it and keep no module alive.

Semantics follow diffusers and the generation path:
- `strength` in (0, 1]: the input is noised to that fraction of the schedule and only the rest
  runs: `denoise_steps(steps, strength)` steps (diffusers' `get_timesteps`).
- image i of a request uses seed + i, from its own CPU generator (as `generate_batch`), which
  draws both the VAE's latent sample of the input and the noise: a request gives the same
  images alone or in a batch (up to batched-matmul rounding).
- the mask marks the area to repaint in white (255); `service.uploads` turns OpenAI's mask
  (alpha 0 = edit) into this form.
"""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from pipelines.generate import (
    GenerationRequest,
    GenerationResult,
    call_kwargs,
    call_pipeline,
    require_final,
    split_results,
)
from pipelines.generate import (
    resolve as fill_defaults,
)
from pipelines.seeds import image_seeds
from pipelines.step_cache import whole_call_cache
from pipelines.token_usage import count_usage

if TYPE_CHECKING:
    from PIL.Image import Image

    from pipelines.loader import LoadedPipeline, ModelDefaults

EditKind = Literal["img2img", "inpaint"]

# Defaults when a request names no strength. img2img: diffusers' own default (keeps the
# layout, changes details); inpaint: the masked area is repainted from pure noise, which is
# what an OpenAI client asking to "edit the transparent area" expects (the unmasked area is
# kept by the mask, not by the strength).
DEFAULT_STRENGTH: dict[EditKind, float] = {"img2img": 0.6, "inpaint": 1.0}


class EditUnsupported(ValueError):
    """The loaded model family has no image-to-image / inpainting pipeline in diffusers."""


@dataclass(frozen=True)
class EditRequest(GenerationRequest):
    """A generation request with an input image (and optionally a mask).

    `image` is RGB; `mask` is "L", 255 where the image is to be repainted, the image's size.
    Both are resized by the pipeline to (width, height). Images do not take part in equality
    (two requests are the same edit only by identity), and travel to an engine process by
    pickle (PIL pickles the raw pixels).
    """

    image: Image | None = field(default=None, compare=False, repr=False)
    mask: Image | None = field(default=None, compare=False, repr=False)
    strength: float | None = None

    @property
    def kind(self) -> EditKind:
        return "inpaint" if self.mask is not None else "img2img"


def denoise_steps(steps: int, strength: float) -> int:
    """Steps actually run for `steps` and `strength`, exactly as diffusers' Flux img2img and
    inpaint pipelines compute them (`get_timesteps`): steps - int(steps - steps * strength).
    E.g. 12 steps at 0.6 run 8, at 0.3 run 4, at 1.0 all 12."""
    init = min(steps * strength, steps)
    start = int(max(steps - init, 0))
    return steps - start


def resolve(
    defaults: ModelDefaults, req: EditRequest, *, default_steps: int | None = None
) -> EditRequest:
    """The edit with size, steps, guidance, seed and strength all set."""
    if req.image is None:
        raise ValueError("an edit needs an input image")
    filled = fill_defaults(defaults, req, default_steps=default_steps)
    strength = req.strength if req.strength is not None else DEFAULT_STRENGTH[req.kind]
    return replace(filled, strength=strength)  # type: ignore[return-value]


def auto_size(image_size: tuple[int, int], multiple: int, max_pixels: int) -> tuple[int, int]:
    """The output size when a request leaves it to us: the input's size, scaled down (aspect
    kept) to fit `max_pixels` when larger, each side rounded down to the model's `multiple`
    (never below one multiple)."""
    width, height = image_size
    scale = min(1.0, math.sqrt(max_pixels / max(width * height, 1)))
    return tuple(  # type: ignore[return-value]
        max(multiple, int(side * scale) // multiple * multiple) for side in (width, height)
    )


def edit_key(loaded: LoadedPipeline, req: EditRequest) -> tuple[Any, ...]:
    """Edits with equal keys can share one pipeline call: same kind (img2img or inpaint),
    output size, steps, strength, guidance and CFG mode. Never equal to a generation key."""
    r = require_final(req)
    if r.strength is None:
        raise ValueError("edit request is not final (strength unset): fill it with edit.resolve")
    return (
        "edit",
        r.kind,
        r.width,
        r.height,
        r.num_inference_steps,
        r.strength,
        r.guidance_scale,
        r.negative_prompt is not None,
        r.step_cache,  # diffusers' hooks hold one state for the whole call
    )


# pipeline -> {kind: derived pipeline}; weak on the key so eviction frees everything.
_DERIVED: weakref.WeakKeyDictionary[Any, dict[EditKind, Any]] = weakref.WeakKeyDictionary()


def derived_pipeline(pipe: Any, kind: EditKind) -> Any:
    """The img2img or inpaint pipeline sharing `pipe`'s modules (built once per pipeline)."""
    cached = _DERIVED.setdefault(pipe, {})
    derived = cached.get(kind)
    if derived is not None and _shares_modules(derived, pipe):
        return derived
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForInpainting if kind == "inpaint" else AutoPipelineForImage2Image
    what = "inpainting" if kind == "inpaint" else "image-to-image"
    try:
        derived = auto.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    except ValueError as exc:
        raise EditUnsupported(
            f"{type(pipe).__name__} has no {what} pipeline in diffusers ({exc}); edits are "
            "not available for this model"
        ) from None
    derived.set_progress_bar_config(disable=True)
    cached[kind] = derived
    return derived


def _shares_modules(derived: Any, pipe: Any) -> bool:
    """True while every module of `derived` is still the loaded pipeline's own object (a
    component swapped or released since means the derived pipeline must be rebuilt)."""
    for name, module in derived.components.items():
        if name == "scheduler" or module is None:
            continue
        if getattr(pipe, name, None) is not module:
            return False
    return True


def edit_batch(
    loaded: LoadedPipeline,
    requests: Sequence[EditRequest],
    *,
    step_callback: Callable[[int, float], None] | None = None,
) -> list[GenerationResult]:
    """Run compatible final edits (equal `edit_key`) as one pipeline call, one generator per
    image: `generate_batch`'s call plus the input images, masks and strength."""
    if not requests:
        return []
    if len({edit_key(loaded, r) for r in requests}) != 1:
        raise ValueError(
            "edits in one batch must share kind, size, steps, strength, guidance and CFG mode"
        )
    first = requests[0]
    width, height = int(first.width or 0), int(first.height or 0)
    steps, strength = int(first.num_inference_steps or 0), float(first.strength or 0.0)
    if denoise_steps(steps, strength) < 1:
        raise ValueError(
            f"strength {strength} of {steps} steps runs no step; raise strength or steps"
        )
    pipe = derived_pipeline(loaded.pipeline, first.kind)
    accepts = set(inspect.signature(pipe.__call__).parameters)
    seeds_per_req = [image_seeds(int(r.seed or 0), r.num_images) for r in requests]
    kwargs = call_kwargs(loaded, accepts, requests, seeds_per_req)
    kwargs["image"] = [r.image for r in requests for _ in range(r.num_images)]
    kwargs["strength"] = strength
    if first.kind == "inpaint":
        kwargs["mask_image"] = [r.mask for r in requests for _ in range(r.num_images)]
    # diffusers' FirstBlockCache hooks for the call (pipelines.step_cache.whole_call_cache).
    with whole_call_cache(pipe, first.step_cache, cfg=first.negative_prompt is not None):
        call = call_pipeline(pipe, kwargs, accepts, step_callback)
    return split_results(
        requests,
        seeds_per_req,
        call,
        # The steps that ran (what the time was spent on), not the schedule length.
        steps=denoise_steps(steps, strength),
        # The input image as the pipeline encodes it: resized to the output size.
        usage=lambda req: count_usage(loaded, req, input_sizes=[(width, height)]),
        timings={"schedule_steps": float(steps)},
    )


def edit(
    loaded: LoadedPipeline,
    request: EditRequest,
    *,
    step_callback: Callable[[int, float], None] | None = None,
) -> GenerationResult:
    """Edit `request.image` into `request.num_images` images; deterministic for a seed. The
    direct call: fills the model's defaults itself (the engine's edits arrive final)."""
    return edit_batch(loaded, [resolve(loaded.defaults, request)], step_callback=step_callback)[0]
