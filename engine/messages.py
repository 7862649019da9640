"""The messages between the HTTP process and the engine process (pickled over a pipe).

HTTP -> engine: `Load`, `Submit`, `Cancel`, `Stop`, `Query`.
Engine -> HTTP: a list of events per send (one loop iteration's worth): `Status`, `Loading`,
`Loaded`, `LoadFailed`, `Evicted`, `Started`, `Progress`, `Preview`, `Finished`, `Failed`,
`Cancelled`,
`Metrics`, `Gpu`, `Answer`.

Plain frozen dataclasses: small, typed, and pickled by multiprocessing's own `Connection`
(images travel as PIL images, which pickle as their raw pixel bytes; see engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

    from engine.failures import EngineError, Failure
    from engine.gpu_memory import GpuReadings
    from engine.keys import ModelKey
    from engine.telemetry import Op
    from pipelines.generate import GenerationRequest, GenerationResult
    from pipelines.loader import ModelDefaults
    from quantization.settings import QuantSettings

# Why a job left before its end (the `reason` label of qds_cancelled_total).
CANCEL_REASONS = ("client_gone", "timeout", "shutdown")


# -- HTTP -> engine ----------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """Load a variant (single flight; answered by `Loaded` or `LoadFailed` for the key)."""

    key: ModelKey
    settings: QuantSettings


@dataclass(frozen=True)
class Submit:
    """Run a resolved request (seed, size, steps set) on a variant."""

    job_id: str
    key: ModelKey
    settings: QuantSettings
    request: GenerationRequest
    allow_load: bool = True
    # Send `Progress` at each step boundary (streaming builds on this).
    progress: bool = False
    # Send a `Preview` of the latents after each of these steps (partial images).
    previews: tuple[int, ...] = ()
    # Who sent it (an API key's position, "" without keys): queued jobs are admitted in turn
    # across owners (engine.scheduler).
    owner: str = ""


@dataclass(frozen=True)
class Cancel:
    """Drop a job from the queue or the running batch at the next step boundary."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop accepting; answer queued jobs `shutting_down`; finish running batches; exit.

    With `cancel_running`, running jobs are dropped at the next step boundary instead.
    """

    cancel_running: bool = False


@dataclass(frozen=True)
class Query:
    """Ask for the engine's accounting (`Answer` carries it): tests and debugging."""

    token: int


# -- engine -> HTTP ----------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    ready: bool
    reason: str
    warnings: tuple[str, ...] = ()
    mode: str = "eager"  # the default model's denoiser: eager, compiling or compiled


@dataclass(frozen=True)
class Loading:
    key: ModelKey


@dataclass(frozen=True)
class Loaded:
    key: ModelKey
    defaults: ModelDefaults
    loaded_at: float
    storage_bytes: int
    components: tuple[str, ...] = ()
    # QDS_LORAS adapters loaded into it (pipelines.lora.LoraAdapters.describe()), or why
    # none could be (its backend cannot take a LoRA).
    loras: tuple[dict[str, Any], ...] = ()
    lora_error: str = ""
    # QDS_QUANT_BACKEND=auto: the short plan it was loaded by
    # (quantization.planning.render.plan_card).
    plan: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoadFailed:
    key: ModelKey
    # BackendUnavailable, ModelLoadFailed, ModelNotLoaded or ShuttingDown.
    failure: Failure


@dataclass(frozen=True)
class Evicted:
    key: ModelKey


@dataclass(frozen=True)
class Started:
    job_id: str
    queue_seconds: float


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    """A cheap decode of a running job's latents (`StepBatch.latents_preview`)."""

    job_id: str
    index: int  # which of the job's previews (0-based)
    step: int
    total: int
    images: list[Image]


@dataclass(frozen=True)
class Finished:
    job_id: str
    result: GenerationResult
    queue_seconds: float
    # Images in the step batch when this job finished (the response's usage.batch_images).
    batch_images: int


@dataclass(frozen=True)
class Failed:
    job_id: str
    # OutOfMemory, EngineError, ShuttingDown, plus LoadFailed's failures for a load on submit.
    failure: Failure | EngineError


@dataclass(frozen=True)
class Cancelled:
    job_id: str
    # "queued" (never ran) or "running" (removed from its batch; `images` dropped).
    where: str
    images: int


@dataclass(frozen=True)
class Metrics:
    ops: list[Op]


@dataclass(frozen=True)
class Alive:
    """The loop is turning (sent once per telemetry period when nothing else is, with work in
    hand or idle): what the HTTP side's stall watchdog waits for."""


@dataclass(frozen=True)
class Gpu:
    readings: GpuReadings


@dataclass(frozen=True)
class Answer:
    token: int
    data: dict[str, Any] = field(default_factory=dict)
