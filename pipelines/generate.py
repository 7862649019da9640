"""Whole-call generation, independent of HTTP: final requests in, images and seeds out.

Requests reach `generate_batch` (and the step loop, and edits) final: the HTTP process's
processor (`service.processor`) fills every default once, with `resolve` below, and nothing
beneath it fills or re-resolves (`require_final` refuses a request that is not). `generate`
is the direct-call convenience for scripts, tests and benchmarks: it fills the defaults the
same way and activates the request's LoRA adapters itself (the engine's scheduler does that
for its batches).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipelines.lora import activate as activate_lora
from pipelines.lora import adapters_of
from pipelines.seeds import image_seeds, random_seed, seeded_generators
from pipelines.step_cache import whole_call_cache
from pipelines.token_usage import TokenUsage, count_usage

if TYPE_CHECKING:
    from PIL.Image import Image

    from pipelines.loader import LoadedPipeline, ModelDefaults


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    # LoRA adapters (declared with QDS_LORAS) and their scales, as `pipelines.lora.
    # normalize_selection` orders them: part of every batch key, since one forward runs with
    # one adapter set.
    lora: tuple[tuple[str, float], ...] = ()
    # Step caching for this request (`pipelines.step_cache`: "off" or e.g. "fbcache:0.2", in
    # canonical form); the service fills QDS_STEP_CACHE when the request names none. Per
    # sample in the step loop (not part of its step key); part of the whole-call batch key.
    step_cache: str = "off"


@dataclass
class GenerationResult:
    images: list[Image]
    seeds: list[int]
    width: int
    height: int
    steps: int
    inference_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    # Token counts (prompt, input images, output patches) for OpenAI's `usage`; filled where
    # the pipeline is (pipelines.token_usage), None from callers that do not count.
    usage: TokenUsage | None = None


def resolve(
    defaults: ModelDefaults, req: GenerationRequest, *, default_steps: int | None = None
) -> GenerationRequest:
    """The request with width, height, steps, guidance and seed all set.

    Steps fall back to `default_steps` (a service-wide override) and then to the model's own
    default. A missing seed is drawn here, once, so everything downstream (batch keys, the
    per-image generators, the response) sees the same value.
    """
    return replace(
        req,
        width=req.width or defaults.size,
        height=req.height or defaults.size,
        num_inference_steps=req.num_inference_steps or default_steps or defaults.steps,
        guidance_scale=req.guidance_scale if req.guidance_scale is not None else defaults.guidance,
        seed=req.seed if req.seed is not None else random_seed(),
    )


def require_final(req: GenerationRequest) -> GenerationRequest:
    """`req` if every field a pipeline needs is set; else a ValueError (a request reaches the
    pipelines final: `service.processor` fills the defaults once, `generate` for direct calls)."""
    missing = [
        name
        for name in ("width", "height", "num_inference_steps", "guidance_scale", "seed")
        if getattr(req, name) is None
    ]
    if missing:
        raise ValueError(
            f"request is not final ({', '.join(missing)} unset): fill it with "
            "pipelines.generate.resolve first"
        )
    return req


def _resolved_key(req: GenerationRequest) -> tuple[Any, ...]:
    return (
        req.width,
        req.height,
        req.num_inference_steps,
        req.guidance_scale,
        req.negative_prompt is not None,
        req.lora,
        req.step_cache,
    )


def batch_key(loaded: LoadedPipeline, req: GenerationRequest) -> tuple[Any, ...]:
    """Requests with equal keys can share one pipeline call (micro-batching)."""
    return _resolved_key(require_final(req))


def call_kwargs(
    loaded: LoadedPipeline,
    accepts: set[str],
    requests: Sequence[GenerationRequest],
    seeds_per_req: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """What every whole call (generation or edit) passes: one prompt and one generator per
    image, the model's sequence length, and the negative prompts (with true CFG) if any."""
    first = requests[0]
    guidance = float(first.guidance_scale or 0.0)
    per_image = [
        (req, seed) for req, seeds in zip(requests, seeds_per_req, strict=True) for seed in seeds
    ]
    kwargs: dict[str, Any] = {
        "prompt": [req.prompt for req, _ in per_image],
        "height": int(first.height or 0),
        "width": int(first.width or 0),
        "num_inference_steps": int(first.num_inference_steps or 0),
        "guidance_scale": guidance,
        "generator": seeded_generators([seed for _, seed in per_image]),
        "output_type": "pil",
    }
    if "max_sequence_length" in accepts and loaded.defaults.max_sequence_length:
        kwargs["max_sequence_length"] = loaded.defaults.max_sequence_length
    if first.negative_prompt is not None and "negative_prompt" in accepts:
        kwargs["negative_prompt"] = [req.negative_prompt or "" for req, _ in per_image]
        if "true_cfg_scale" in accepts:
            # Flux's guidance_scale is a distilled embedding; a negative prompt only acts
            # through true CFG, so turn it on when one is given.
            kwargs["true_cfg_scale"] = max(guidance, 1.5)
    return kwargs


def split_results(
    requests: Sequence[GenerationRequest],
    seeds_per_req: Sequence[list[int]],
    call: PipelineCall,
    *,
    steps: int,
    usage: Callable[[GenerationRequest], TokenUsage],
    timings: dict[str, float] | None = None,
) -> list[GenerationResult]:
    """One result per request from one call's images (in request order)."""
    first = requests[0]
    results = []
    offset = 0
    for req, seeds in zip(requests, seeds_per_req, strict=True):
        results.append(
            GenerationResult(
                images=call.images[offset : offset + len(seeds)],
                seeds=seeds,
                width=int(first.width or 0),
                height=int(first.height or 0),
                steps=steps,
                inference_seconds=call.seconds,
                timings={
                    "step_seconds_mean": call.step_seconds_mean,
                    "batch_images": float(len(call.images)),
                    **(timings or {}),
                },
                usage=usage(req),
            )
        )
        offset += len(seeds)
    return results


@dataclass
class PipelineCall:
    images: list[Any]
    seconds: float
    step_times: list[float]

    @property
    def step_seconds_mean(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0


def backend_choices(loaded: LoadedPipeline) -> list[tuple[str, str | None]]:
    """(backend, quant type) of every quantized component: QDS_QUANT_BACKEND=auto mixes
    backends, so a per-backend property of the pipeline must hold for each choice."""
    plan = loaded.extra.get("plan", {}).get("components", {})
    return [(c["backend"], c["quant_type"]) for c in plan.values()] or [
        (loaded.backend, loaded.quant_type)
    ]


def allows_inference_mode(loaded: LoadedPipeline) -> bool:
    """Whether every backend the pipeline was quantized with runs under
    `torch.inference_mode` (`QuantBackend.allows_inference_mode`)."""
    from quantization.backends import get_backend

    return all(get_backend(b).allows_inference_mode(t) for b, t in backend_choices(loaded))


def grad_mode(inference: bool) -> AbstractContextManager[Any]:
    """`torch.inference_mode` when `inference` (a batch's `allows_inference_mode`, decided
    once), else `no_grad`. The engine runs its batches in it: a lone request's step loop on
    the demo model is ~5% faster; batches of 4-8 gain nothing measurable. Thread-local, like
    both modes: each lane thread enters it itself."""
    import torch

    return torch.inference_mode() if inference else torch.no_grad()


def call_pipeline(
    pipe: Any,
    kwargs: dict[str, Any],
    accepts: set[str],
    step_callback: Callable[[int, float], None] | None = None,
) -> PipelineCall:
    """One pipeline call, timed per diffusers step (generations and edits share it)."""
    import torch

    step_times: list[float] = []
    last = [time.perf_counter()]

    def _on_step(_pipe: Any, step: int, _t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        if step_callback is not None:
            step_callback(step, step_times[-1])
        return cb_kwargs

    if "callback_on_step_end" in accepts:
        kwargs["callback_on_step_end"] = _on_step

    start = time.perf_counter()
    # no_grad, as diffusers' own __call__: what a plain pipeline call gets (the bench's direct
    # call and LitServe peer run it so). The engine's batches wrap it in `grad_mode`, which is
    # inference_mode where the backend allows it (quanto's int4/int2 kernels do not).
    with torch.no_grad():
        output = pipe(**kwargs)
    return PipelineCall(list(output.images), time.perf_counter() - start, step_times)


def generate_batch(
    loaded: LoadedPipeline,
    requests: Sequence[GenerationRequest],
    *,
    step_callback: Callable[[int, float], None] | None = None,
) -> list[GenerationResult]:
    """Run several compatible final requests as one pipeline call, one generator per image.

    Each image has its own generator, so it is the image the request would get alone with
    the same seed (up to batched-matmul rounding). All requests must share `batch_key`. The
    adapters of `requests[0].lora` must be active (the engine's scheduler activates them).
    """
    if not requests:
        return []
    keys = {batch_key(loaded, r) for r in requests}
    if len(keys) != 1:
        raise ValueError(
            "requests in one batch must share size, steps, guidance, CFG mode and LoRA adapters"
        )
    pipe = loaded.pipeline
    accepts = set(inspect.signature(pipe.__call__).parameters)
    seeds_per_req = [image_seeds(int(r.seed or 0), r.num_images) for r in requests]
    kwargs = call_kwargs(loaded, accepts, requests, seeds_per_req)
    first = requests[0]
    # diffusers' hooks: one call is one batch whose samples start and end together.
    with whole_call_cache(pipe, first.step_cache, cfg=first.negative_prompt is not None):
        call = call_pipeline(pipe, kwargs, accepts, step_callback)
    return split_results(
        requests,
        seeds_per_req,
        call,
        steps=int(requests[0].num_inference_steps or 0),
        usage=lambda req: count_usage(loaded, req),
    )


def generate(
    loaded: LoadedPipeline,
    request: GenerationRequest,
    *,
    step_callback: Callable[[int, float], None] | None = None,
) -> GenerationResult:
    """Generate `request.num_images` images; deterministic for a given seed. The direct
    call: fills the model's defaults and activates the request's adapters itself."""
    request = resolve(loaded.defaults, request)
    activate_lora(loaded, request.lora)  # (none: the base, bit-exact)
    return generate_batch(loaded, [request], step_callback=step_callback)[0]


def warm_up_lora(loaded: LoadedPipeline, sizes: list[tuple[int, int]], steps: int = 2) -> None:
    """One short generation per size with the slot enabled (compiled pipelines: the enabled
    slot is each block's second graph), then back to the base."""
    lora = adapters_of(loaded)
    if lora is None or not lora.adapters:
        return
    first = next(iter(lora.adapters))
    for width, height in sizes:
        generate(
            loaded,
            GenerationRequest(
                "warm-up",
                num_inference_steps=steps,
                seed=0,
                width=width,
                height=height,
                lora=((first, 1.0),),
            ),
        )
    lora.activate(())
