"""The batches the scheduler steps: H5's step-level `StepBatch` where the pipeline supports
it, and `WholeCallBatch` (one `generate_batch` call) for every other pipeline.

Both answer the same questions (`can_join`, `add`, `remove`, `step`, `len`, `job_ids`,
`progress`, `key`), so the scheduler does not care which it drives. The difference: one
`StepBatch.step()` is one denoising step, and requests join between steps; one
`WholeCallBatch.step()` is a whole pipeline call, joinable only before it starts, and a
cancelled request can only stop the call when every request of it is gone (diffusers' step-end
callback raises; `between_steps` lets the engine read its pipe meanwhile).

Image edits (`pipelines.edit.EditRequest`) always run whole-call (`EditBatch`): their own
batch kind (`edit.edit_key`), so they share a call only with compatible edits, never a step
with generations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipelines import edit
from pipelines.generate import (
    GenerationRequest,
    GenerationResult,
    allows_inference_mode,
    batch_key,
    generate_batch,
    grad_mode,
)

if TYPE_CHECKING:
    from pipelines.loader import LoadedPipeline
    from pipelines.prompt_cache import PromptCache

try:  # H5's step loop; absent in older checkouts
    from pipelines import stepping
except ImportError:  # pragma: no cover - depends on the checkout
    stepping = None  # type: ignore[assignment]

StepHook = Callable[[int, float], None]


class Batch(Protocol):
    """What the scheduler drives. A batch with a true `reports_steps` attribute reports its own
    per-step durations through `on_step`; otherwise each `step()` is one timed step."""

    @property
    def key(self) -> tuple[Any, ...] | None: ...
    def can_join(self, req: GenerationRequest) -> bool: ...
    def add(self, job_id: str, req: GenerationRequest) -> None: ...
    def remove(self, job_id: str) -> bool: ...
    def step(self) -> list[tuple[str, GenerationResult]]: ...
    def __len__(self) -> int: ...
    def job_ids(self) -> list[str]: ...
    def progress(self, job_id: str) -> tuple[int, int]: ...


class _Aborted(Exception):
    """Raised from the step-end callback when every request of the call was removed."""


class WholeCallBatch:
    """Requests sharing `generate.batch_key`, run as one pipeline call."""

    reports_steps = True

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        max_images: int,
        on_step: StepHook | None = None,
        between_steps: Callable[[], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.max_images = max_images
        self.on_step = on_step
        self.between_steps = between_steps
        self._jobs: dict[str, GenerationRequest] = {}
        self._removed: set[str] = set()
        self._key: tuple[Any, ...] | None = None
        self._started = False
        self._steps_done = 0
        self._inference_mode = allows_inference_mode(loaded)

    @property
    def key(self) -> tuple[Any, ...] | None:
        return self._key

    def __len__(self) -> int:
        return sum(r.num_images for j, r in self._jobs.items() if j not in self._removed)

    def job_ids(self) -> list[str]:
        return [j for j in self._jobs if j not in self._removed]

    def can_join(self, req: GenerationRequest) -> bool:
        if self._started:
            return False
        if not self._jobs:
            return True
        return self._key_of(req) == self._key and len(self) + req.num_images <= self.max_images

    def add(self, job_id: str, req: GenerationRequest) -> None:
        if self._started:
            raise RuntimeError("a whole-call batch cannot take requests once it has started")
        if not self._jobs:
            self._key = self._key_of(req)
        self._jobs[job_id] = req

    def remove(self, job_id: str) -> bool:
        if job_id not in self._jobs or job_id in self._removed:
            return False
        if self._started:
            self._removed.add(job_id)  # the call stops once all are removed
        else:
            del self._jobs[job_id]
        return True

    def progress(self, job_id: str) -> tuple[int, int]:
        return self._steps_done, self._total(self._jobs[job_id])

    def step(self) -> list[tuple[str, GenerationResult]]:
        self._started = True
        ids = list(self._jobs)

        def on_step(step: int, seconds: float) -> None:
            self._steps_done = step + 1
            if self.on_step is not None:
                self.on_step(step, seconds)
            if self.between_steps is not None:
                self.between_steps()
            if self._removed.issuperset(ids):
                raise _Aborted

        try:
            with grad_mode(self._inference_mode):
                results = self._run([self._jobs[j] for j in ids], on_step)
        except _Aborted:
            results = []
        done = [(j, r) for j, r in zip(ids, results, strict=False) if j not in self._removed]
        self._jobs.clear()
        self._removed.clear()
        return done

    # What differs between a generation and an edit batch:
    def _key_of(self, req: GenerationRequest) -> tuple[Any, ...]:
        return batch_key(self.loaded, req)

    def _total(self, req: GenerationRequest) -> int:
        return int(req.num_inference_steps or 0)

    def _run(self, requests: list[GenerationRequest], on_step: StepHook) -> list[GenerationResult]:
        return generate_batch(self.loaded, requests, step_callback=on_step)


class EditBatch(WholeCallBatch):
    """Edits sharing `edit.edit_key` (img2img or inpaint, size, steps, strength, guidance, CFG
    mode), run as one call of the img2img / inpaint pipeline derived from the loaded one."""

    def can_join(self, req: GenerationRequest) -> bool:
        return isinstance(req, edit.EditRequest) and super().can_join(req)

    def _key_of(self, req: GenerationRequest) -> tuple[Any, ...]:
        return edit.edit_key(self.loaded, req)  # type: ignore[arg-type]

    def _total(self, req: GenerationRequest) -> int:
        # The steps that run (strength skips the start of the schedule).
        strength = getattr(req, "strength", None)
        steps = int(req.num_inference_steps or 0)
        return edit.denoise_steps(steps, strength) if strength is not None else steps

    def _run(self, requests: list[GenerationRequest], on_step: StepHook) -> list[GenerationResult]:
        return edit.edit_batch(self.loaded, requests, step_callback=on_step)  # type: ignore[arg-type]


def compat_key(loaded: LoadedPipeline, req: GenerationRequest) -> tuple[Any, ...]:
    """What requests must share to be in one batch of this pipeline."""
    if isinstance(req, edit.EditRequest):
        return edit.edit_key(loaded, req)
    if uses_stepping(loaded):
        return stepping.step_key(loaded, req)
    return batch_key(loaded, req)


def uses_stepping(loaded: LoadedPipeline) -> bool:
    return stepping is not None and stepping.supports_stepping(loaded)


def is_step_batch(batch: Batch) -> bool:
    """A step-level batch: its `step()` touches only its own samples and the pipeline's
    stateless modules, so two of them may step at once (lanes)."""
    return stepping is not None and isinstance(batch, stepping.StepBatch)


def new_batch(
    loaded: LoadedPipeline,
    *,
    max_images: int,
    prompt_cache: PromptCache | None = None,
    on_step: StepHook | None = None,
    between_steps: Callable[[], None] | None = None,
) -> Batch:
    """A step batch where the pipeline supports it, else a whole-call batch."""
    if uses_stepping(loaded):
        # One step() is one denoising step: the scheduler times it (no `reports_steps`).
        return stepping.StepBatch(loaded, prompt_cache=prompt_cache, max_images=max_images)
    return WholeCallBatch(
        loaded, max_images=max_images, on_step=on_step, between_steps=between_steps
    )
