"""QDS_COMPILE: torch.compile of the denoiser, when it is on and how much of it
(QDS_COMPILE_SCOPE), and the warm-up that compiles every graph the engine will run before
readiness turns 200.

Why `auto` turns it on for step batching on a CPU: measured side by side as served
(`bench compile-serving`), the compiled denoiser serves more images per second there for the
backends whose `compiles_by_default` says so, with the eager images up to float rounding
(`bench compile`). Why only there: inductor needs a C++ compiler on a
CPU (the images have g++; without one it stays eager), GPU compile start-up for a
Flux-size denoiser was not measured here, and whole-call pipelines (SD3, SDXL) would compile
at their first request.

Why `model` scope on a CPU: the whole denoiser as one graph also fuses what runs between the
blocks (embeddings, rotary positions, the output norm: about 10% of a step outside the compiled
blocks in a profile under load), and served more images per second than compiled blocks
(compile-serving.md) at the price of a longer first compile (warm-up on an empty inductor
cache: 72 s in compile.md vs 60 s for blocks in its previous run, git f89b475). `blocks`
(diffusers' regional compilation) stays the choice elsewhere: diffusers documents its first
compile as much shorter for large denoisers, and a whole Flux-size compile on a GPU was not
measured.

Dynamo keys a compiled graph on the grad mode, the intra-op thread count and (until it
has seen two) the batch size: the warm-up runs the step loop itself, under the grad mode
its batches use, at one and two images, on the engine's thread count and, with lanes, on a
lane's, so requests at the warm-up sizes meet no compile in the sequences tested. With
QDS_COMPILE_BACKGROUND (the default; `model` scope) that warm-up runs eager and the graphs it
met compile on a background thread while the engine serves (engine/startup.py); requests then
meet no compile at any size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from engine.batches import uses_stepping
from pipelines import lora, step_cache
from pipelines.generate import GenerationRequest, backend_choices, generate
from quantization.backends import ModelLoadError, get_backend

if TYPE_CHECKING:
    from pipelines.loader import LoadedPipeline

log = logging.getLogger("qdserve.compile")

WARMUP_STEPS = 2
WARMUP_CACHE = "fbcache:0"  # the split forward, every sample computing
# Graphs per compiled module: grad mode x thread count (main, lane) x batch (static 1, dynamic) x
# sizes, LoRA slot on/off. Dynamo's default limit (8) was reached with lanes and two sizes;
# past it dynamo silently runs the module eagerly.
RECOMPILE_LIMIT = 64

Scope = Literal["model", "blocks"]


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU, or None when there is none."""
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler (and may change it)
        return None


def compile_decision(setting: bool | str, loaded: LoadedPipeline) -> tuple[bool, str]:
    """(compile?, why) for QDS_COMPILE = true / false / auto on this loaded pipeline."""
    if setting is True:
        return True, "QDS_COMPILE=true"
    if setting is False:
        return False, "QDS_COMPILE=false"
    if not str(loaded.device).startswith("cpu"):
        return False, f"auto: off on {loaded.device} (compile start-up not measured there)"
    if not uses_stepping(loaded):
        return False, "auto: off for whole-call pipelines (only Flux step batching measured)"
    choices = backend_choices(loaded)
    if not all(get_backend(b).compiles_by_default(t) for b, t in choices):
        names = ", ".join(f"{b}:{t}" if t else b for b, t in choices)
        return False, f"auto: off for {names} (not measured faster within 2/255 compiled)"
    if cpp_compiler() is None:
        return False, "auto: off, no C++ compiler for inductor on this machine"
    return True, "auto: on (CPU, Flux step batching, a measured backend, C++ compiler found)"


def compile_scope(setting: str, loaded: LoadedPipeline) -> Scope:
    """QDS_COMPILE_SCOPE resolved: auto is the whole model on a CPU, the blocks elsewhere."""
    if setting in ("model", "blocks"):
        return setting  # type: ignore[return-value]
    return "model" if str(loaded.device).startswith("cpu") else "blocks"


def denoiser_of(loaded: LoadedPipeline) -> Any:
    """The pipeline's denoiser module (transformer or unet)."""
    pipe = loaded.pipeline
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ModelLoadError("QDS_COMPILE is on but this pipeline has no denoiser to compile")
    return denoiser


def process_default(config: Any, name: str, value: Any) -> None:
    """Set a torch config value for every thread of this process.

    torch 2.13 keeps a plain write (`torch._dynamo.config.x = v`) per thread (a ContextVar):
    written on the engine's main or model-load thread, it never reaches the background
    compile thread or the lanes, which start with no override and compile too. The entry's
    environment default is what every thread without an override of its own reads, so the
    value goes there (an operator's force variable, e.g. TORCHINDUCTOR_*_FORCE, still wins).
    Hand-written against torch's private `_config` table: the config module has no public
    process-wide setter; tests/unit/test_startup.py checks a new thread sees the value."""
    config._config[name].env_value_default = value
    setattr(config, name, value)  # this thread too, where an override may exist already


def compile_denoiser(loaded: LoadedPipeline, scope: str = "auto") -> None:
    """Compile the denoiser: as one graph (`model`), or one repeated block compiled once and
    reused for all of them (`blocks`, regional compilation)."""
    import torch

    denoiser = denoiser_of(loaded)
    config = torch._dynamo.config
    process_default(config, "recompile_limit", max(config.recompile_limit, RECOMPILE_LIMIT))
    if compile_scope(scope, loaded) == "model":
        denoiser.compile()
        return
    if not hasattr(denoiser, "compile_repeated_blocks"):
        raise ModelLoadError(
            "QDS_COMPILE_SCOPE=blocks but this pipeline's denoiser has no repeated blocks"
        )
    denoiser.compile_repeated_blocks()


def uncompile(loaded: LoadedPipeline) -> None:
    """Back to eager (auto mode, after a compile or warm-up that failed), either scope."""
    import torch

    for module in loaded.pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                # What nn.Module.compile() sets, on the denoiser (model) or on each block.
                if getattr(sub, "_compiled_call_impl", None) is not None:
                    sub._compiled_call_impl = None
            step_cache.forget_parts(module)  # the step cache's split forward, if compiled
    torch._dynamo.reset()


def warmup_sizes(setting: list[str], loaded: LoadedPipeline) -> list[tuple[int, int]]:
    """QDS_WARMUP_SIZES ("WxH" each), or the model's default square size."""
    sizes = [tuple(int(v) for v in s.split("x")) for s in setting]
    return [(w, h) for w, h in sizes] or [(loaded.defaults.size, loaded.defaults.size)]


def default_warmup(
    loaded: LoadedPipeline,
    sizes: list[tuple[int, int]],
    lanes: int = 1,
    adapters: tuple[tuple[str, float], ...] = (),
) -> None:
    """Short generations per size through the path requests take: the step loop (batches of 1
    and 2 images; on a lane thread too when `lanes` > 1) or a whole pipeline call."""
    if not uses_stepping(loaded):
        for width, height in sizes:
            generate(loaded, _request(width, height, 1, adapters))
        return
    from engine.lanes import Lanes

    # QDS_STEP_CACHE on (the engine notes it in loaded.extra): the split forward requests
    # will run is warmed up too. A denoiser compiled as one graph cannot run split, so its
    # parts are compiled as graphs of their own (step_cache.compile_parts); at threshold 0
    # every sample computes, so each part meets one and two images, as the whole model does,
    # and dynamo makes their batch dimension dynamic: a sub-batch of any size meets no compile.
    cached = step_cache.parse(loaded.extra.get("step_cache")) is not None
    transformer = loaded.pipeline.transformer
    impl = getattr(transformer, "_compiled_call_impl", None)
    if cached and impl is not None:
        # A background compiler (engine.startup) compiles the parts on its thread too: its
        # `wrap` (duck-typed: engine.startup imports this module, not the other way round).
        step_cache.compile_parts(transformer, getattr(impl, "wrap", None))

    def loop() -> None:
        for width, height in sizes:
            start = time.perf_counter()
            for images in (1, 2):
                _run_steps(loaded, _request(width, height, images, adapters))
                if cached:
                    _run_steps(
                        loaded,
                        replace(_request(width, height, images, adapters), step_cache=WARMUP_CACHE),
                    )
            log.info("warm-up %dx%d took %.1fs", width, height, time.perf_counter() - start)

    lora.activate(loaded, adapters)
    try:
        loop()
        if lanes > 1:
            Lanes.get(lanes).run_or_raise([loop])
    finally:
        lora.activate(loaded, ())


def _request(
    width: int, height: int, images: int, adapters: tuple[tuple[str, float], ...]
) -> GenerationRequest:
    return GenerationRequest(
        "warm-up",
        num_inference_steps=WARMUP_STEPS,
        seed=0,
        width=width,
        height=height,
        num_images=images,
        lora=adapters,
    )


def _run_steps(loaded: LoadedPipeline, request: GenerationRequest) -> None:
    from pipelines.generate import resolve
    from pipelines.stepping import StepBatch

    batch = StepBatch(loaded, max_images=request.num_images)
    batch.add("warm-up", resolve(loaded.defaults, request))
    while len(batch):
        batch.step()
