"""Step caching per sample in the continuous batch (`QDS_STEP_CACHE`, the `step_cache` field).

First-block cache (FBCache; ParaAttention's "first block cache", diffusers'
`hooks/first_block_cache.py`): at each step the first transformer block runs for every
sample; a sample whose first-block residual changed little since the last step it computed
(relative L1, below the threshold) skips the remaining blocks and reuses their residual from
that step (output = first-block output + cached residual, then the output norm and
projection); the samples that compute run the remaining blocks as ONE sub-batch.

The math is diffusers' FirstBlockCache (`FBCHeadBlockHook._should_compute_remaining_blocks`
and the tail residual of `FBCBlockHook`); where this loop differs, and why:

- per sample, not per batch: diffusers keeps one state per module and takes one `.mean()`
  over the whole batch, so one decision for all samples. In a continuous batch the samples
  sit at different steps of their own schedules (a sample that just joined has no previous
  residual at all), so each image row keeps its own residuals (`SampleCache`, held by the
  sample's job in `pipelines.stepping`, so it joins and leaves with the sample) and decides
  from its own relative L1;
- the state moves with the batch order: the computed rows are gathered into a sub-batch and
  their results scattered back, instead of hooks skipping whole block calls;
- only the image stream's tail residual is kept: diffusers also keeps the text stream's, but
  Flux's output (`norm_out` / `proj_out`) reads the image stream only;
- the previous first-block residual is updated only on the steps the sample computes, as
  diffusers does (a sample that keeps skipping compares with its last computed step, so the
  drift adds up and it eventually recomputes).

TaylorSeer (`taylorseer:<interval>`; arXiv 2503.06923, diffusers' `hooks/taylorseer_cache.py`):
a sample runs the whole denoiser on its first steps and then every `interval`-th step, and on
the steps between, nothing of the denoiser runs for it: its prediction is extrapolated from
the last computed ones (a first-order Taylor series in the step index). The schedule and the
math are diffusers' (`TaylorSeerCacheHook._measure_should_compute`, `TaylorSeerState.update` /
`predict`, `max_order=1`, `disable_cache_before_step=3`); where this loop differs, and why:

- per sample, from the sample's own step: diffusers counts calls of the hooked module, one
  counter for the batch; here each request's stream counts its own forwards, so a sample that
  joins mid-batch starts its own warm-up, and the samples that compute this step run the
  denoiser as one sub-batch while the others are predicted;
- one place, the denoiser's output, is extrapolated (what diffusers' lite mode does for
  Flux: the projection out cached, the blocks skipped): the prediction is the one tensor the
  step loop reads, so no per-block state has to follow the batch order;
- the factors stay in the output's dtype (diffusers stores them in bfloat16 to save GPU
  memory; one sample's output is small, and on a CPU each bfloat16 round trip costs time).

Both methods can be in one batch, with uncached samples: TaylorSeer's decision comes first
(the rows it predicts run nothing), then first-block caching among the rows that run.

Whole-call pipelines (SD3, SDXL, edits) use diffusers' own hooks (`whole_call_cache`): one
pipeline call is one batch that starts and ends together, which is what their single state
assumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qdserve.step_cache")

OFF = "off"
FBCACHE = "fbcache"
TAYLORSEER = "taylorseer"
METHODS = (FBCACHE, TAYLORSEER)
# The threshold range a request or QDS_STEP_CACHE may give. 0 computes every step (the cache
# then only costs its bookkeeping: the warm-up uses it to compile the split forward).
MAX_THRESHOLD = 1.0
# TaylorSeer's interval: 1 computes every step; past 10 a 28-step image is mostly guessed.
MAX_INTERVAL = 10
# diffusers' TaylorSeerCacheConfig defaults: full steps before the first prediction, order.
TAYLOR_WARMUP_STEPS = 3
TAYLOR_ORDER = 1
GRAMMAR = (
    "`off`, `fbcache:<threshold>` (threshold 0..1, e.g. `fbcache:0.2`) or "
    f"`taylorseer:<interval>` (a whole step every 1..{MAX_INTERVAL} steps, e.g. `taylorseer:3`)"
)


@dataclass(frozen=True)
class StepCacheSpec:
    """A parsed step cache setting: the method and its parameter (fbcache's threshold,
    TaylorSeer's interval)."""

    method: str
    threshold: float = 0.0
    interval: int = 1

    def __str__(self) -> str:
        if self.method == TAYLORSEER:
            return f"{self.method}:{self.interval}"
        return f"{self.method}:{self.threshold:g}"


def parse(text: str | None) -> StepCacheSpec | None:
    """`off` (or empty / None) -> None; `fbcache:<threshold>` or `taylorseer:<interval>` -> a
    spec. ValueError names the accepted grammar."""
    value = (text or "").strip().lower()
    if value in ("", OFF, "none", "false", "0"):
        return None
    method, _, params = value.partition(":")
    if method not in METHODS:
        raise ValueError(f"unknown step cache method {method!r}; expected {GRAMMAR}")
    what = "an interval" if method == TAYLORSEER else "a threshold"
    if not params:
        raise ValueError(f"{method} needs {what}; expected {GRAMMAR}")
    if method == TAYLORSEER:
        try:
            interval = int(params)
        except ValueError:
            raise ValueError(
                f"interval {params!r} is not a whole number; expected {GRAMMAR}"
            ) from None
        if not 1 <= interval <= MAX_INTERVAL:
            raise ValueError(f"interval {interval} is outside 1..{MAX_INTERVAL}")
        return StepCacheSpec(method, interval=interval)
    try:
        threshold = float(params)
    except ValueError:
        raise ValueError(f"threshold {params!r} is not a number; expected {GRAMMAR}") from None
    if not 0.0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold {threshold:g} is outside 0..{MAX_THRESHOLD:g}")
    return StepCacheSpec(method, threshold)


def taylor_computes(spec: StepCacheSpec, step: int) -> bool:
    """Whether a TaylorSeer sample runs the denoiser at its `step` (0-based): diffusers'
    `TaylorSeerCacheHook._measure_should_compute` with `disable_cache_after_step=None`."""
    if step < TAYLOR_WARMUP_STEPS:
        return True
    return (step - TAYLOR_WARMUP_STEPS - 1) % spec.interval == 0


def canonical(text: str | None) -> str:
    """The setting in its one written form (`off`, `fbcache:0.2`): requests compare equal."""
    spec = parse(text)
    return OFF if spec is None else str(spec)


# -- per-sample state ---------------------------------------------------------------------


@dataclass
class _Stream:
    """One forward kind's state ("cond", or "uncond" with a negative prompt), rows = images."""

    head_residual: torch.Tensor | None = None  # first-block residual at the last computed step
    tail_residual: torch.Tensor | None = None  # remaining blocks' residual at that step
    # TaylorSeer: this stream's forwards so far (= the sample's step), the step of the last
    # computed one, and the factors from it (0: the output, 1: its divided difference).
    steps: int = 0
    taylor_step: int | None = None
    factors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SampleCache:
    """The cache state of one request's images; lives in its job, so it joins and leaves
    with the request."""

    spec: StepCacheSpec
    streams: dict[str, _Stream] = field(default_factory=dict)
    computed: int = 0  # sample-steps that ran the remaining blocks
    skipped: int = 0  # sample-steps that reused them


@dataclass
class Counts:
    """Block runs of the cached samples: one sample through one block is one run."""

    computed: int = 0
    skipped: int = 0

    def take(self) -> tuple[int, int]:
        out = (self.computed, self.skipped)
        self.computed = self.skipped = 0
        return out


# -- the split forward ----------------------------------------------------------------------

HEAD_BLOCKS = 1  # dual-stream blocks in the head (FBCache: the first one)


def tail_blocks(transformer: Any) -> int:
    return (
        len(transformer.transformer_blocks)
        - HEAD_BLOCKS
        + len(transformer.single_transformer_blocks)
    )


def _head(
    transformer: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """FluxTransformer2DModel.forward (diffusers 0.42) up to and including the first block:
    the same operations in the same order (no controlnet / IP-adapter inputs: the step loop
    passes none). Returns (hidden, encoder, temb, cos, sin, first-block residual)."""
    import torch

    t = transformer
    hidden = t.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden.dtype) * 1000
    temb = (
        t.time_text_embed(timestep, pooled_projections)
        if guidance is None
        else t.time_text_embed(timestep, guidance, pooled_projections)
    )
    encoder = t.context_embedder(encoder_hidden_states)
    rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    before = hidden
    for block in t.transformer_blocks[:HEAD_BLOCKS]:
        encoder, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=encoder,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs={},
        )
    return hidden, encoder, temb, rotary[0], rotary[1], hidden - before


def _tail(
    transformer: Any,
    hidden: torch.Tensor,
    encoder: torch.Tensor,
    temb: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """The remaining blocks for the rows that compute: the image stream after the last one."""
    t = transformer
    rotary = (cos, sin)
    for block in list(t.transformer_blocks[HEAD_BLOCKS:]) + list(t.single_transformer_blocks):
        encoder, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=encoder,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs={},
        )
    return hidden


def _out(transformer: Any, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return transformer.proj_out(transformer.norm_out(hidden, temb))


# Compiled parts per transformer: set by `compile_parts` (the engine's warm-up, when the
# denoiser was compiled as one graph). Otherwise the parts run as the modules are: eager, or
# through their compiled blocks (QDS_COMPILE_SCOPE=blocks).
_COMPILED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def compile_parts(transformer: Any, compile: Callable[[Callable, str], Any] | None = None) -> None:
    """Compile the head, the tail and the output as graphs of their own (the whole-model
    graph cannot serve a forward split in two). Their batch dimension becomes dynamic after
    the warm-up has run them at two sizes (dynamo's automatic dynamic shapes, as for the whole
    model), so a sub-batch of any other size meets no compile.

    `compile(fn, name)` makes each part's compiled callable: `torch.compile` by default; the
    engine's background compiler passes its own (`engine.startup.BackgroundCompiler.wrap`),
    so with QDS_COMPILE_BACKGROUND the parts compile off the serving threads too."""
    if transformer in _COMPILED:
        return
    if compile is None:
        import torch

        def compile(fn: Callable, _name: str) -> Any:
            return torch.compile(fn)

    _COMPILED[transformer] = {
        "head": compile(_head, "head"),
        "tail": compile(_tail, "tail"),
        "out": compile(_out, "out"),
    }


def forget_parts(transformer: Any) -> None:
    """Back to eager parts (the engine's fallback when a compile or warm-up failed)."""
    _COMPILED.pop(transformer, None)


def parts_compiled(transformer: Any) -> bool:
    return transformer in _COMPILED


def _part(transformer: Any, name: str) -> Any:
    compiled = _COMPILED.get(transformer)
    if compiled is not None:
        return compiled[name]
    return {"head": _head, "tail": _tail, "out": _out}[name]


def _rel_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """diffusers' `_should_compute_remaining_blocks` measure, per row: mean |r - r_prev| over
    mean |r_prev| (diffusers takes both means over the whole batch)."""
    dims = tuple(range(1, current.dim()))
    return (current - previous).abs().mean(dim=dims) / previous.abs().mean(dim=dims)


# Inputs with a row per image (the others, txt_ids and img_ids, are per position, shared).
_PER_ROW = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def cached_forward(
    transformer: Any,
    kind: str,
    rows: list[tuple[SampleCache | None, int]],
    counts: Counts,
    **inputs: Any,
) -> torch.Tensor:
    """One denoiser forward for the batch with per-sample step caching.

    `rows` lists the batch's requests in order: (their cache state or None when the request
    runs uncached, their image count). `inputs` are the transformer's keyword inputs for the
    whole batch (hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance,
    txt_ids, img_ids). Returns the prediction, (batch, tokens, channels).

    TaylorSeer samples decide first, from their own step: those that predict run nothing; the
    rest run as one sub-batch through the first-block cached forward (where TaylorSeer
    samples and uncached ones always compute)."""
    import torch

    runs: list[bool] = []
    taylor: list[_Stream | None] = []
    for state, _images in rows:
        stream = None
        if state is not None and state.spec.method == TAYLORSEER:
            stream = state.streams.setdefault(kind, _Stream())
            runs.append(stream.taylor_step is None or taylor_computes(state.spec, stream.steps))
        else:
            runs.append(True)
        taylor.append(stream)
    n_blocks = HEAD_BLOCKS + tail_blocks(transformer)
    if all(runs):
        out = _first_block_forward(transformer, kind, _fb_rows(rows), counts, **inputs)
    else:
        batch = sum(images for _, images in rows)
        keep = torch.tensor(
            [run for run, (_, images) in zip(runs, rows, strict=True) for _ in range(images)]
        )
        out = None
        if bool(keep.any()):
            # The rows that run, as one sub-batch (a sub-batch of any size meets no compile:
            # the parts' batch dimension is dynamic after the warm-up).
            sub = keep.nonzero().flatten().to(inputs["hidden_states"].device)
            sub_inputs = {
                k: (v[sub] if k in _PER_ROW and v is not None else v) for k, v in inputs.items()
            }
            sub_rows = [r for r, run in zip(rows, runs, strict=True) if run]
            ran = _first_block_forward(transformer, kind, _fb_rows(sub_rows), counts, **sub_inputs)
            out = ran.new_empty((batch, *ran.shape[1:]))
            out[sub] = ran
        offset = 0
        for (state, images), stream, run in zip(rows, taylor, runs, strict=True):
            if not run:
                assert state is not None and stream is not None
                predicted = _taylor_predict(stream)
                if out is None:
                    out = predicted.new_empty((batch, *predicted.shape[1:]))
                out[offset : offset + images] = predicted
            offset += images
        assert out is not None
    # TaylorSeer's bookkeeping: computed samples update their factors, every one counts a step.
    offset = 0
    for (state, images), stream, run in zip(rows, taylor, runs, strict=True):
        if state is not None and stream is not None:
            if run:
                _taylor_update(stream, out[offset : offset + images])
                state.computed += images
                counts.computed += images * n_blocks
            else:
                state.skipped += images
                counts.skipped += images * n_blocks
            stream.steps += 1
        offset += images
    return out


def _fb_rows(rows: list[tuple[SampleCache | None, int]]) -> list[tuple[SampleCache | None, int]]:
    """The rows as the first-block cache sees them: only fbcache samples keep their state."""
    return [
        (state if state is not None and state.spec.method == FBCACHE else None, images)
        for state, images in rows
    ]


def _taylor_update(stream: _Stream, output: torch.Tensor) -> None:
    """diffusers' `TaylorSeerState.update` for one output, up to TAYLOR_ORDER."""
    factors = [output.detach().clone()]
    if stream.taylor_step is not None and stream.factors:
        delta = stream.steps - stream.taylor_step
        for order in range(TAYLOR_ORDER):
            if order >= len(stream.factors) or stream.factors[order].shape != factors[order].shape:
                break
            factors.append((factors[order] - stream.factors[order]) / delta)
    stream.factors = factors
    stream.taylor_step = stream.steps


def _taylor_predict(stream: _Stream) -> torch.Tensor:
    """diffusers' `TaylorSeerState.predict`: sum over orders of factor * offset^k / k!."""
    offset = stream.steps - (stream.taylor_step or 0)
    out = stream.factors[0].clone()
    for order in range(1, len(stream.factors)):
        out += stream.factors[order] * (offset**order / math.factorial(order))
    return out


def _first_block_forward(
    transformer: Any,
    kind: str,
    rows: list[tuple[SampleCache | None, int]],
    counts: Counts,
    **inputs: Any,
) -> torch.Tensor:
    """The denoiser forward with per-sample first-block caching (`rows` whose state is None
    always compute)."""
    import torch

    head = _part(transformer, "head")
    hidden, encoder, temb, cos, sin, residual = head(transformer, **inputs)
    batch = hidden.shape[0]
    compute = torch.ones(batch, dtype=torch.bool)
    offset = 0
    per_request: list[tuple[SampleCache | None, _Stream | None, int]] = []
    for state, images in rows:
        stream = None
        if state is not None:
            stream = state.streams.setdefault(kind, _Stream())
            if stream.head_residual is not None and stream.tail_residual is not None:
                diff = _rel_l1(residual[offset : offset + images], stream.head_residual)
                # diffusers: compute when diff > threshold (a skip needs diff <= threshold).
                compute[offset : offset + images] = diff.cpu() > state.spec.threshold
        per_request.append((state, stream, offset))
        offset += images
    idx = compute.nonzero().flatten()
    # The image stream after the last block: computed rows from the tail itself (so a row
    # that computes gets what the uncached forward gives it), skipped rows as the first-block
    # output plus their cached residual (diffusers' FBCHeadBlockHook).
    final = hidden.clone() if len(idx) < batch else hidden
    if len(idx) == batch:
        final = _part(transformer, "tail")(transformer, hidden, encoder, temb, cos, sin)
    elif len(idx):
        # The rows that compute, as one sub-batch. The rotary embedding is per position,
        # shared by every row; temb and both streams are per row.
        sub = idx.to(hidden.device)
        final[sub] = _part(transformer, "tail")(
            transformer, hidden[sub], encoder[sub], temb[sub], cos, sin
        )
    n_tail = tail_blocks(transformer)
    for (state, stream, start), (_, images) in zip(per_request, rows, strict=True):
        if state is None or stream is None:
            continue
        mask = compute[start : start + images]
        rows_ = slice(start, start + images)
        if stream.tail_residual is None or bool(mask.all()):
            stream.head_residual = residual[rows_].clone()
            stream.tail_residual = final[rows_] - hidden[rows_]
        else:
            # Computed rows take the new residuals, skipped rows keep theirs and reuse the
            # cached tail residual (whole-tensor selects: no per-row Python loop).
            keep = mask.to(hidden.device).view(-1, *([1] * (hidden.dim() - 1)))
            if bool(mask.any()):
                stream.head_residual = torch.where(keep, residual[rows_], stream.head_residual)
                stream.tail_residual = torch.where(
                    keep, final[rows_] - hidden[rows_], stream.tail_residual
                )
            final[rows_] = torch.where(keep, final[rows_], hidden[rows_] + stream.tail_residual)
        done = int(mask.sum())
        state.computed += done
        state.skipped += images - done
        counts.computed += images * HEAD_BLOCKS + done * n_tail
        counts.skipped += (images - done) * n_tail
    # One layout whichever way `final` was built: the tail's own output is a view into the
    # single blocks' joint text+image sequence, and a compiled part guards on strides (a
    # recompile at the first mixed step was measured without this). `.contiguous()` alone is
    # not enough: at one image the view counts as contiguous yet keeps the joint sequence's
    # batch stride, which dynamo also guards on (a second `out` graph, compiled on the first
    # lone request whose steps skipped). Only where `out` is a graph of its own: with the
    # repeated blocks compiled instead (QDS_COMPILE_SCOPE=blocks) the extra copy made their
    # dynamo guards meet a new stride after the warm-up (a recompile, measured by
    # test_compiled_cache_meets_no_compile_after_warm_up[blocks]; why, not established).
    if transformer in _COMPILED and final.stride() != _dense_strides(final.shape):
        final = final.clone(memory_format=torch.contiguous_format)
    return _part(transformer, "out")(transformer, final.contiguous(), temb)


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


# -- whole-call pipelines -------------------------------------------------------------------


@contextlib.contextmanager
def whole_call_cache(pipe: Any, setting: str | None, *, cfg: bool = False) -> Iterator[None]:
    """diffusers' own cache hooks (FirstBlockCache, TaylorSeer) around one whole pipeline call
    (SD3, SDXL's UNet has none: left uncached; Flux edits): a call's samples start and end
    together, which is what the hooks' single state per module assumes. Removed after the
    call, so the next call (maybe another setting) starts clean."""
    spec = parse(setting)
    denoiser = getattr(pipe, "transformer", None)
    if spec is None or denoiser is None or not hasattr(denoiser, "enable_cache"):
        yield
        return
    if _is_compiled(denoiser):
        # Hooks swapped into a compiled denoiser would recompile it at request time (and
        # again after they are removed): refused, said in the log, the call runs uncached.
        _warn_once(
            (type(pipe).__name__, "compiled"),
            f"step cache {spec} not applied to {type(pipe).__name__} calls: the denoiser is "
            "compiled (QDS_COMPILE); they run uncached",
        )
        yield
        return
    # The hooks keep their state per cache context. FluxPipeline and SD3's pipeline set one per
    # forward kind ("cond", "uncond"); diffusers 0.42's Flux img2img / inpaint set none (the
    # hooks then refuse to run), so the call gets one context of its own here, which is only
    # right when there is one forward kind: with true CFG (a negative prompt) it runs uncached.
    own_contexts = _sets_cache_context(pipe)
    if not own_contexts and cfg:
        _warn_once(
            (type(pipe).__name__, "cfg"),
            f"step cache {spec} not applied to {type(pipe).__name__} calls with a negative "
            "prompt: the pipeline sets no cache context per forward kind; they run uncached",
        )
        yield
        return
    denoiser.enable_cache(_hooks_config(spec))
    try:
        with contextlib.nullcontext() if own_contexts else denoiser.cache_context("call"):
            yield
    finally:
        denoiser.disable_cache()


def _hooks_config(spec: StepCacheSpec) -> Any:
    """diffusers' hook config for a setting (the same parameters as the step loop's)."""
    if spec.method == TAYLORSEER:
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig

        # Lite mode: only `proj_out` is extrapolated and the blocks are skipped on predicted
        # steps, the same place the step loop extrapolates. The full mode keeps factors for
        # every attention module's outputs: for Flux-dev at 1024x1024 that is gigabytes of GPU
        # memory (57 blocks x 2 factors x ~4600 tokens x 3072), the cost our users cannot
        # spare; lite keeps one output's (1 MB in float32).
        return TaylorSeerCacheConfig(
            cache_interval=spec.interval,
            disable_cache_before_step=TAYLOR_WARMUP_STEPS,
            max_order=TAYLOR_ORDER,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        )
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=spec.threshold)


def _is_compiled(module: Any) -> bool:
    """nn.Module.compile() on the module itself or on any block (either QDS_COMPILE_SCOPE)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _sets_cache_context(pipe: Any) -> bool:
    """Whether the pipeline's __call__ opens the denoiser's cache contexts itself."""
    import inspect

    try:
        return "cache_context" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


_WARNED: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    """A refusal is logged once per pipeline class and reason, not on every call."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)
