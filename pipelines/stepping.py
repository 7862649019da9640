"""Step-level continuous batching for Flux pipelines: samples join and leave between steps.

`generate_batch` runs whole pipeline calls: a request that arrives while a batch denoises
waits for all of its steps. Here the denoising loop of diffusers' `FluxPipeline.__call__` is
unrolled one step at a time with the pipeline's own components (`encode_prompt`,
`prepare_latents`, the scheduler's sigma schedule, the transformer, the VAE and the image
processor), so that:

- each request keeps its own sigma schedule and step index; the transformer takes a timestep
  per sample (shape (B,)), so samples at different steps share one forward;
- a request joins at the next step boundary (`add`) and leaves after its own last step
  (`step` returns it, decoded), or at once when dropped (`remove`);
- a request run alone gets exactly what `generate()` computes for it (same CPU generator per
  image, seed + i; same schedule; same float32 Euler update), and in a batch the same up to
  the rounding of batched matmuls (tests/backends/test_stepping.py states the measured tolerance).

Only `FluxPipeline` itself qualifies (`supports_stepping`): its subclasses and other families
(SD3, SDXL) add inputs or use other schedulers, and keep whole-call batching. Nothing here
knows about HTTP or processes; the engine drives `add` / `remove` / `step`.
"""

from __future__ import annotations

import copy
import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines import step_cache
from pipelines.generate import (
    GenerationRequest,
    GenerationResult,
    allows_inference_mode,
    grad_mode,
    require_final,
)
from pipelines.previews import flux_preview, observe_decode
from pipelines.seeds import image_seeds, seeded_generators
from pipelines.token_usage import count_usage

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from pipelines.loader import LoadedPipeline
    from pipelines.prompt_cache import PromptCache

# FluxPipeline.__call__'s default, used when the model defaults name no sequence length.
_FLUX_MAX_SEQUENCE_LENGTH = 512


Embeddings = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]  # prompt, pooled, text ids


def supports_stepping(loaded: LoadedPipeline) -> bool:
    """True when this pipeline can run the step-level loop (Flux-family denoisers, which take
    a timestep per sample). Others fall back to whole-call batching (generate_batch)."""
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    pipe = loaded.pipeline
    # Exact type: subclasses (img2img, inpaint, Kontext, ...) change the loop's inputs.
    if type(pipe) is not FluxPipeline:
        return False
    scheduler = pipe.scheduler
    # Stochastic sampling draws fresh noise inside scheduler.step; the loop here does not.
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.get(
        "stochastic_sampling", False
    )


def step_key(loaded: LoadedPipeline, req: GenerationRequest) -> tuple[Any, ...]:
    """Requests with equal step keys can share a transformer forward at any step: same resolved
    width, height, guidance, CFG mode (negative prompt or not). Steps may differ (each sample
    keeps its own sigma schedule)."""
    r = require_final(req)
    return (r.width, r.height, r.guidance_scale, r.negative_prompt is not None)


def variant_id(loaded: LoadedPipeline) -> str:
    """What changes a prompt's embeddings: model, backend, quantized components, dtype, device."""
    quantized = ",".join(sorted(n for n, c in loaded.components.items() if c.quantized))
    dtype = str(loaded.compute_dtype).removeprefix("torch.")
    return (
        f"{loaded.model}|{loaded.model_path}|{loaded.backend}:{loaded.quant_type}"
        f"|q={quantized}|{dtype}|{loaded.device}"
    )


@dataclass
class _Job:
    job_id: str
    request: GenerationRequest
    seeds: list[int]
    embeds: Embeddings
    negative: Embeddings | None
    latents: torch.Tensor  # packed, (images, tokens, channels)
    timesteps: torch.Tensor
    sigmas: torch.Tensor  # len(timesteps) + 1, ends at 0
    added: float
    step: int = 0
    velocity: torch.Tensor | None = None  # the last step's prediction, for previews
    forward_seconds: float = 0.0
    batch_images_sum: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    usage: Any = None  # counted at add (tokenizers on the driving thread, not in a lane)
    # Per-sample step cache state (pipelines.step_cache), None when the request runs uncached:
    # it lives here so that it joins and leaves the batch with the request.
    cache: step_cache.SampleCache | None = None

    @property
    def images(self) -> int:
        return self.request.num_images

    @property
    def total(self) -> int:
        return len(self.timesteps)


@dataclass
class _PipelineFacts:
    """What every StepBatch of one pipeline looks up, kept for the pipeline's lifetime.

    Worked out once, not per batch: the device lookups walk every module's hooks, and the
    scheduler copy and its schedules cost a deepcopy and a schedule build; per batch that was
    about 1% of a request at concurrency 1. The placement of a loaded pipeline (device,
    offload hooks) does not change after loading.
    """

    device: Any
    vae_device: Any
    max_sequence_length: int
    # Schedules come from a private copy: set_timesteps mutates the scheduler, and the
    # pipeline's own one may serve whole-call generate_batch on the same pipeline.
    scheduler: Any
    schedules: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )


_FACTS: weakref.WeakKeyDictionary[Any, _PipelineFacts] = weakref.WeakKeyDictionary()


def _facts(pipe: Any, max_sequence_length: int | None) -> _PipelineFacts:
    facts = _FACTS.get(pipe)
    if facts is None:
        accepts = inspect.signature(pipe.__call__).parameters
        default_len = (
            accepts["max_sequence_length"].default if "max_sequence_length" in accepts else None
        )
        facts = _PipelineFacts(
            device=pipe._execution_device,
            vae_device=_module_device(pipe.vae),
            max_sequence_length=int(
                max_sequence_length or default_len or _FLUX_MAX_SEQUENCE_LENGTH
            ),
            scheduler=copy.deepcopy(pipe.scheduler),
        )
        _FACTS[pipe] = facts
    return facts


class StepBatch:
    """Samples being denoised together; samples join and leave at step boundaries.

    Not thread-safe: one thread drives a batch (and its pipeline) at a time.
    """

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        prompt_cache: PromptCache | None = None,
        max_images: int = 4,
        variant: str | None = None,
    ) -> None:
        if not supports_stepping(loaded):
            raise ValueError(
                f"{type(loaded.pipeline).__name__} cannot run the step-level loop (only "
                "FluxPipeline with a deterministic flow-match Euler scheduler); use generate_batch"
            )
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.loaded = loaded
        self.pipe = loaded.pipeline
        self.prompt_cache = prompt_cache
        self.max_images = max_images
        self.variant = variant or variant_id(loaded)
        self.steps_run = 0  # transformer steps run by this batch (CFG's second forward not counted)
        # Block runs of cached samples since the engine last took them (metrics).
        self.cache_counts = step_cache.Counts()
        # Decided once: every step enters the mode (on whichever lane thread runs it).
        self._inference_mode = allows_inference_mode(loaded)
        facts = _facts(self.pipe, loaded.defaults.max_sequence_length)
        self._device = facts.device
        self._vae_device = facts.vae_device
        self._max_sequence_length = facts.max_sequence_length
        self._scheduler = facts.scheduler
        self._schedules = facts.schedules
        self._jobs: dict[str, _Job] = {}
        self._key: tuple[Any, ...] | None = None
        self._img_ids: torch.Tensor | None = None
        # Concatenated prompt embeddings of the current members; rebuilt when they change.
        self._stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- membership ---------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(j.images for j in self._jobs.values())

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    @property
    def key(self) -> tuple[Any, ...] | None:
        """The step key every member shares (None while empty: anything may start it)."""
        return self._key

    def can_join(self, req: GenerationRequest) -> bool:
        """Same step key and room left. An empty batch takes any request, even one with more
        images than max_images, so a large request is never stuck."""
        if not self._jobs:
            return True
        return (
            step_key(self.loaded, req) == self._key
            and len(self) + req.num_images <= self.max_images
        )

    def add(self, job_id: str, req: GenerationRequest) -> None:
        """Encode the prompt (through the prompt cache), draw the initial latents from CPU
        generators seeded per image (image i uses seed + i, as generate_batch does), and put the
        request's images in the batch at step 0 of their own schedule. req is fully resolved
        (seed, width, height, steps set)."""
        self.add_many([(job_id, req)])

    def add_many(self, items: Sequence[tuple[str, GenerationRequest]]) -> None:
        """`add` for requests that join at the same step boundary, with ONE text-encoder call
        for all their prompts the cache does not hold (4 prompts one by one cost 2.4x one
        batched call on the demo model). All or none join: every check runs first."""

        self._check_joinable(items)
        added = time.perf_counter()
        pipe = self.pipe
        device = self._device
        texts = [r.prompt for _, r in items]
        texts += [r.negative_prompt for _, r in items if r.negative_prompt is not None]
        with grad_mode(self._inference_mode):
            encoded = self._encode(list(dict.fromkeys(texts)))
            encode_seconds = time.perf_counter() - added
            for job_id, req in items:
                started = time.perf_counter()
                embeds = encoded[req.prompt]
                seeds = image_seeds(int(req.seed or 0), req.num_images)
                # One CPU generator per image, as generate_batch passes them.
                generators = seeded_generators(seeds)
                latents, img_ids = pipe.prepare_latents(
                    req.num_images,
                    pipe.transformer.config.in_channels // 4,
                    int(req.height or 0),
                    int(req.width or 0),
                    embeds[0].dtype,
                    device,
                    generators,
                )
                timesteps, sigmas = self._schedule(
                    int(req.num_inference_steps or 0), latents.shape[1]
                )
                if self._img_ids is None:
                    self._img_ids = img_ids
                self._jobs[job_id] = _Job(
                    job_id=job_id,
                    request=req,
                    seeds=seeds,
                    embeds=embeds,
                    negative=(
                        encoded[req.negative_prompt] if req.negative_prompt is not None else None
                    ),
                    latents=latents,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    added=added,
                    timings={
                        "encode_seconds": encode_seconds,
                        "prepare_seconds": time.perf_counter() - started,
                    },
                    usage=count_usage(self.loaded, req),
                    cache=_sample_cache(req),
                )
                self._key = step_key(self.loaded, req)
        self._stacked = None

    def _check_joinable(self, items: Sequence[tuple[str, GenerationRequest]]) -> None:
        """can_join for each item in turn, as if the earlier ones had joined."""
        images, key = len(self), self._key
        seen: set[str] = set()
        for job_id, req in items:
            if job_id in self._jobs or job_id in seen:
                raise ValueError(f"job {job_id!r} is already in the batch")
            seen.add(job_id)
            require_final(req)
            if req.num_images < 1:
                raise ValueError(f"num_images must be >= 1, got {req.num_images}")
            k = step_key(self.loaded, req)
            if images and (k != key or images + req.num_images > self.max_images):
                raise ValueError(
                    f"job {job_id!r} cannot join: step key {k} vs {key}, {images} of "
                    f"{self.max_images} images taken"
                )
            images, key = images + req.num_images, k

    def remove(self, job_id: str) -> bool:
        """Drop a request's samples (client gone, deadline, shutdown) before the next step."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        self._membership_changed()
        return True

    def progress(self, job_id: str) -> tuple[int, int]:
        """(steps done, total steps) of a request in the batch; KeyError when not in it."""
        job = self._jobs[job_id]
        return job.step, job.total

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[tuple[str, GenerationResult]]:
        """Run ONE denoiser forward for all samples, advance each by its own sigma, decode and
        return the requests whose last step this was (removed from the batch). Raises on a
        pipeline error (torch.OutOfMemoryError included) without catching it."""
        import torch

        if not self._jobs:
            return []
        jobs = list(self._jobs.values())
        start = time.perf_counter()
        with grad_mode(self._inference_mode):
            noise_pred = self._velocity(jobs)
            finished: list[_Job] = []
            offset = 0
            for job in jobs:
                v = noise_pred[offset : offset + job.images]
                offset += job.images
                # FlowMatchEulerDiscreteScheduler.step, per request: the scheduler object keeps
                # ONE step index (and sigma) for the whole batch, which is exactly what samples
                # on different schedules cannot share, so the update is written out here with
                # the same operations: upcast to float32, x + (sigma_next - sigma) * v, cast
                # back to the prediction's dtype.
                sigma = job.sigmas[job.step]
                sigma_next = job.sigmas[job.step + 1]
                sample = job.latents.to(torch.float32)
                job.latents = (sample + (sigma_next - sigma) * v).to(v.dtype)
                job.velocity = v
                job.step += 1
                if job.step == job.total:
                    finished.append(job)
        forward = time.perf_counter() - start
        batch_images = len(self)
        for job in jobs:
            job.forward_seconds += forward
            job.batch_images_sum += batch_images
        self.steps_run += 1
        if not finished:
            return []
        for job in finished:
            del self._jobs[job.job_id]
        self._membership_changed()
        return self._finish(finished)

    def latents_preview(self, job_id: str) -> list[Image]:
        """A cheap preview of the request's current latents, from the predicted x0.

        After step k the latents sit at sigma_k and the last velocity v predicts the clean
        sample x0 = x - sigma_k * v (flow matching: x = (1 - sigma) x0 + sigma * noise). Before
        the first step it shows the initial noise. Rendered by pipelines.previews: a
        linear latent -> RGB map fitted to this pipeline's VAE (under a millisecond at 32x32),
        real VAE decodes while that fit is still learning; no transformer forward.
        """
        import torch

        job = self._jobs[job_id]
        with grad_mode(self._inference_mode):
            if job.velocity is None:
                x0 = job.latents
            else:
                sigma = job.sigmas[job.step]
                x0 = (job.latents.to(torch.float32) - sigma * job.velocity).to(job.latents.dtype)
            return flux_preview(self.pipe, x0, job.request, self._decode)

    # -- internals ------------------------------------------------------------------------

    def _membership_changed(self) -> None:
        self._stacked = None
        if not self._jobs:
            self._key = None
            self._img_ids = None

    def _encode(self, texts: list[str]) -> dict[str, Embeddings]:
        """text -> (prompt_embeds, pooled_prompt_embeds, text_ids), each of batch 1.

        Texts the cache holds are not encoded; the others go through ONE encode_prompt call.
        A text encoded alone is cached as the very tensors encode_prompt returned; one encoded
        beside others as a copy of its row (the encoders treat rows independently: measured
        bit-identical to encoding it alone on CPU; like generate_batch's own batched encode,
        a GPU may differ in the last bits).
        """
        cache = self.prompt_cache
        out: dict[str, Embeddings] = {}
        missing = []
        for text in texts:
            hit = cache.get(self.prompt_key(text)) if cache is not None else None
            if hit is not None:
                out[text] = hit  # type: ignore[assignment]
            else:
                missing.append(text)
        if not missing:
            return out
        pipe = self.pipe
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=missing,
            prompt_2=None,
            device=self._device,
            num_images_per_prompt=1,
            max_sequence_length=self._max_sequence_length,
        )
        for i, text in enumerate(missing):
            if len(missing) == 1:
                value = (embeds, pooled, text_ids)
            else:
                # A copy, not a view: a view would keep the whole batch alive in the cache.
                value = (embeds[i : i + 1].clone(), pooled[i : i + 1].clone(), text_ids)
            out[text] = value
            if cache is not None:
                cache.put(self.prompt_key(text), value)
        return out

    def prompt_key(self, text: str) -> tuple[str, str, str]:
        """The prompt cache key of `text` for this batch's model variant."""
        # The kind names what was computed: the same text as a prompt or as a negative
        # prompt gives the same embeddings, so both share one entry.
        kind = f"flux.encode_prompt:max_sequence_length={self._max_sequence_length}"
        return (self.variant, text, kind)

    def _schedule(self, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and sigmas exactly as FluxPipeline.__call__ sets them, once per length."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        cached = self._schedules.get((steps, image_seq_len))
        if cached is not None:
            return cached
        scheduler = self._scheduler
        config = scheduler.config
        sigmas: Any = np.linspace(1.0, 1 / steps, steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self._device, sigmas=sigmas, mu=mu)
        schedule = (timesteps, scheduler.sigmas)
        self._schedules[(steps, image_seq_len)] = schedule
        return schedule

    def _stack(self, jobs: list[_Job]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-image prompt embeddings of all members, in batch order (cached until they change)."""
        import torch

        if self._stacked is None:

            def rows(pick: str) -> tuple[torch.Tensor, torch.Tensor]:
                pairs = [(getattr(j, pick), j.images) for j in jobs]
                return (
                    torch.cat([e[0].expand(n, -1, -1) for e, n in pairs]),
                    torch.cat([e[1].expand(n, -1) for e, n in pairs]),
                )

            stacked = {"cond": rows("embeds")}
            if jobs[0].negative is not None:
                stacked["uncond"] = rows("negative")
            self._stacked = stacked
        return self._stacked

    def _velocity(self, jobs: list[_Job]) -> torch.Tensor:
        """The transformer's prediction for every member, true CFG applied (FluxPipeline's)."""
        import torch

        pipe = self.pipe
        transformer = pipe.transformer
        latents = torch.cat([j.latents for j in jobs])
        # A timestep per sample: each request is at its own step of its own schedule.
        timestep = torch.cat([j.timesteps[j.step].expand(j.images) for j in jobs]).to(latents.dtype)
        guidance_scale = float(jobs[0].request.guidance_scale or 0.0)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full(
                [latents.shape[0]], guidance_scale, device=latents.device, dtype=torch.float32
            )
        stacked = self._stack(jobs)
        text_ids = jobs[0].embeds[2]
        # Step caching per sample (pipelines.step_cache) once any member asks for it: the
        # forward runs split in two, the uncached members always computing.
        cached = any(j.cache is not None for j in jobs)
        rows = [(j.cache, j.images) for j in jobs]

        def forward(kind: str, embeds: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> Any:
            if cached:
                return step_cache.cached_forward(
                    transformer,
                    kind,
                    rows,
                    self.cache_counts,
                    hidden_states=latents,
                    encoder_hidden_states=embeds[0],
                    pooled_projections=embeds[1],
                    timestep=timestep / 1000,
                    guidance=guidance,
                    txt_ids=ids,
                    img_ids=self._img_ids,
                )
            with _cache_context(transformer, kind):
                return transformer(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=embeds[1],
                    encoder_hidden_states=embeds[0],
                    txt_ids=ids,
                    img_ids=self._img_ids,
                    joint_attention_kwargs={},
                    return_dict=False,
                )[0]

        noise_pred = forward("cond", stacked["cond"], text_ids)
        if "uncond" in stacked:
            negative = jobs[0].negative
            assert negative is not None
            neg_noise_pred = forward("uncond", stacked["uncond"], negative[2])
            # The scale generate_batch passes as true_cfg_scale when a negative prompt is set.
            true_cfg_scale = max(guidance_scale, 1.5)
            noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        return noise_pred

    def _decode(self, packed: torch.Tensor, req: GenerationRequest) -> list[Image]:
        """VAE decode + postprocess, as at the end of FluxPipeline.__call__."""
        pipe = self.pipe
        vae = pipe.vae
        latents = pipe._unpack_latents(
            packed, int(req.height or 0), int(req.width or 0), pipe.vae_scale_factor
        )
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        latents = latents.to(self._vae_device)
        image = vae.decode(latents, return_dict=False)[0]
        return list(pipe.image_processor.postprocess(image, output_type="pil"))

    def _finish(self, finished: list[_Job]) -> list[tuple[str, GenerationResult]]:
        import torch

        with grad_mode(self._inference_mode):
            # ONE VAE decode for every request that finished at this step: they share the
            # batch's step key (same size), and on the demo model 8 single-image decodes cost
            # 36 ms vs 23 ms for one of 8 (about 3% of a batch). A decoded row then depends on
            # its neighbours only through batched-conv rounding (measured <= 1/255, inside the
            # stated 2/255), as the transformer forward already does.
            start = time.perf_counter()
            packed = torch.cat([job.latents for job in finished])
            decoded = self._decode(packed, finished[0].request)
            done = time.perf_counter()
            # The final decode teaches the preview map (pipelines.previews) for free.
            observe_decode(self.pipe, packed, finished[0].request, decoded)
            results = []
            offset = 0
            for job in finished:
                images = decoded[offset : offset + job.images]
                offset += job.images
                req = job.request
                results.append(
                    (
                        job.job_id,
                        GenerationResult(
                            images=images,
                            seeds=job.seeds,
                            width=int(req.width or 0),
                            height=int(req.height or 0),
                            steps=job.total,
                            inference_seconds=done - job.added,
                            timings={
                                **job.timings,
                                "step_seconds_mean": job.forward_seconds / job.total,
                                "batch_images": job.batch_images_sum / job.total,
                                "decode_seconds": done - start,
                                **_cache_timings(job),
                            },
                            usage=job.usage,
                        ),
                    )
                )
        return results


def _cache_timings(job: _Job) -> dict[str, float]:
    """Sample-steps that ran / reused the remaining blocks (cached requests only)."""
    if job.cache is None:
        return {}
    return {"cache_computed": float(job.cache.computed), "cache_skipped": float(job.cache.skipped)}


def _sample_cache(req: GenerationRequest) -> step_cache.SampleCache | None:
    spec = step_cache.parse(req.step_cache)
    return step_cache.SampleCache(spec) if spec is not None else None


def _cache_context(transformer: Any, name: str) -> Any:
    """The transformer's cache context (FluxPipeline uses it for its caching hooks)."""
    import contextlib

    ctx = getattr(transformer, "cache_context", None)
    return ctx(name) if ctx is not None else contextlib.nullcontext()


def _module_device(module: Any) -> Any:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # pragma: no cover - older diffusers
        return next(module.parameters()).device
    return get_module_execution_device(module)
