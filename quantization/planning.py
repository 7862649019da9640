"""Choose a backend and quant type per component before any weight is read.

`QDS_QUANT_BACKEND=auto` and `qdserve plan` use this. Inputs: the model's component configs
(parameter counts come from instantiating each class on the `meta` device, so nothing is
allocated or read), the device (CPU, or CUDA with its capability and memory; real or
described), the backend registry (what the installed libraries can run there) and the measured
tables in `quantization/plan_tables.py`. Output: one choice per denoiser / text encoder such
that the weights plus the measured activation peak at the default size fit the memory budget,
ranked by `QDS_PRIORITY` (quality, speed or memory), with the reason for every choice and for
every alternative left out. The rules are written out in docs/planning.md.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from quantization import plan_tables as tables
from quantization.environment import DeviceInfo

PRIORITIES: tuple[str, ...] = ("quality", "speed", "memory")
# Policy, not a measurement: what is held back from the device's memory for what no table
# here measures (the CUDA context, allocator fragmentation, the server process itself).
DEFAULT_MARGIN_FRACTION = 0.10

PUBLISHED_CONFIGS = Path(__file__).parent / "plan_configs"
PUBLISHED_MODELS = {
    tables.FLUX_DEV: ("black-forest-labs/FLUX.1-dev", PUBLISHED_CONFIGS / "flux-dev"),
    tables.SD3_MEDIUM: (
        "stabilityai/stable-diffusion-3-medium-diffusers",
        PUBLISHED_CONFIGS / "sd3-medium",
    ),
}
DENOISER_NAMES = ("transformer", "unet")


class PlanError(RuntimeError):
    """No plan can be made (nothing fits, unreadable model, bad input); the message says why."""


# --- sizes ---------------------------------------------------------------------------------

# The same units as QDS_CACHE_MEMORY_BUDGET (service/settings.py): 1000-based unless "i".
_UNITS = {
    "": 1,
    "b": 1,
    **{f"{u}{b}": 1000**p for p, u in enumerate("kmgt", 1) for b in ("", "b")},
    **{f"{u}i{b}": 1024**p for p, u in enumerate("kmgt", 1) for b in ("", "b")},
}


def parse_bytes(value: str | int) -> int:
    """`17179869184`, `16GB` (10^9) or `16GiB` (2^30) -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise PlanError(
            f"{value!r} is not a size; use bytes or a number with a unit: "
            "16GB (10^9 bytes), 16GiB (2^30), MB, MiB, TB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: float) -> str:
    """Bytes in GB (10^9) or MB, as the benchmark reports print them."""
    if abs(n) >= 10**9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.2f} MB"


# --- the model -----------------------------------------------------------------------------

Role = Literal["denoiser", "text_encoder", "vae", "other"]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    library: str
    class_name: str
    parameters: int
    float_buffers: int  # elements of floating-point buffers (they move with the dtype too)
    linear_weights: int = 0  # elements of nn.Linear weights: what every backend quantizes
    other_buffer_bytes: int = 0  # integer buffers (position ids): their own dtype

    @property
    def role(self) -> Role:
        if self.name in DENOISER_NAMES:
            return "denoiser"
        if self.name.startswith("text_encoder"):
            return "text_encoder"
        if self.name == "vae":
            return "vae"
        return "other"

    def unquantized_bytes(self, dtype_bytes: int) -> int:
        return (self.parameters + self.float_buffers) * dtype_bytes + self.other_buffer_bytes


@dataclass(frozen=True)
class ModelSpec:
    model: str
    source: str
    pipeline_class: str
    components: tuple[ComponentSpec, ...]
    arch: str | None
    arch_note: str
    default_size: int

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)


@lru_cache(maxsize=64)
def _count(library: str, class_name: str, config_json: str) -> tuple[int, int, int, int]:
    """(parameters, float buffer elements, Linear weight elements, other buffer bytes)."""
    import torch
    from accelerate import init_empty_weights

    config = json.loads(config_json)
    module = __import__(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PlanError(f"{library} has no class {class_name!r} (model_index.json)")
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class.from_dict(config))
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if torch.is_floating_point(b))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = sum(
        b.numel() * b.element_size() for b in model.buffers() if not torch.is_floating_point(b)
    )
    return params, buffers, linear, other


def resolve_model_folder(model: str) -> tuple[str, Path]:
    """(display id, folder holding model_index.json) for a QDS_MODEL value or a published name."""
    if model in ("", "embedded"):
        raise PlanError(
            "the embedded model is the pipelines package's: pass its folder "
            "(pipelines.embedded.embedded_model_path()), as `qdserve plan` does"
        )
    if model in PUBLISHED_MODELS:
        return PUBLISHED_MODELS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), path
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, local_files_only=True, allow_patterns=["*.json"])
    except Exception as exc:
        raise PlanError(
            f"model {model!r} is neither a local diffusers folder nor in the HF cache ({exc}); "
            f"`qdserve plan` also knows {', '.join(PUBLISHED_MODELS)} (published configs)"
        ) from exc
    return model, Path(folder)


def read_model_spec(model: str, display: str | None = None) -> ModelSpec:
    """Component configs and parameter counts of a diffusers pipeline, without its weights."""
    model_id, folder = resolve_model_folder(model)
    model_id = display or model_id
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PlanError(f"{folder} has no model_index.json; point at a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    components = []
    for name, spec in sorted(index.items()):
        if not (
            isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")
        ):
            continue
        config_path = folder / name / "config.json"
        if not config_path.is_file():
            continue  # schedulers, tokenizers: no config.json with weights behind it
        library, class_name = spec
        counts = _count(library, class_name, config_path.read_text())
        components.append(ComponentSpec(name, library, class_name, *counts))
    if not any(c.role == "denoiser" for c in components):
        raise PlanError(f"{model_id}: no transformer or unet component to plan for")
    meta_path = folder / "qdserve.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    arch, note = identify_arch(components)
    return ModelSpec(
        model=model_id,
        source=str(folder),
        pipeline_class=str(index.get("_class_name", "?")),
        components=tuple(components),
        arch=arch,
        arch_note=note,
        # The loader's own fallback (pipelines/loader.py `_model_defaults`) is 1024 too.
        default_size=int(meta.get("default_size") or 1024),
    )


def identify_arch(components: Sequence[ComponentSpec]) -> tuple[str | None, str]:
    """Which measured architecture the denoiser is: same class, same parameter count."""
    den = next(c for c in components if c.role == "denoiser")
    for arch, (class_name, params, source) in tables.DENOISER_PARAMETERS.items():
        if den.class_name == class_name and den.parameters == params:
            return arch, f"{class_name} with {params:,} parameters = the {arch} runs ({source})"
    return None, (
        f"{den.class_name} with {den.parameters:,} parameters matches no measured denoiser: "
        "storage, speed and activation fall back to the most conservative measured values"
    )


# --- the device ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    kind: Literal["cpu", "cuda"]
    name: str
    capability: tuple[int, int] | None
    total_bytes: int | None
    free_bytes: int | None
    described: bool

    @property
    def info(self) -> DeviceInfo:
        """What the backend registry's `unavailable_reason` checks."""
        return DeviceInfo(self.kind == "cuda", self.name, self.capability, self.total_bytes)

    @property
    def label(self) -> str:
        where = "described" if self.described else "this machine"
        if self.kind == "cpu":
            mem = f", {human(self.total_bytes)}" if self.total_bytes else ""
            return f"cpu{mem} ({where})"
        major, minor = self.capability or (0, 0)
        mem = human(self.total_bytes) if self.total_bytes else "memory unknown"
        return f"cuda {self.name}, compute capability {major}.{minor}, {mem} ({where})"


def describe_device(
    kind: str, capability: str | None = None, memory: str | None = None
) -> DeviceSpec:
    """A device that is not this machine: `--device cuda --capability 8.9 --memory 16GB`."""
    total = parse_bytes(memory) if memory else None
    if kind == "cpu":
        if total is None:
            return replace(detect_device_spec("cpu"), described=True)
        return DeviceSpec("cpu", "cpu", None, total, total, described=True)
    if kind != "cuda":
        raise PlanError(f"--device {kind!r}; allowed: cpu, cuda")
    if capability is None or total is None:
        raise PlanError(
            "a described CUDA device needs --capability (e.g. 8.9) and --memory (e.g. 16GB)"
        )
    try:
        major, minor = (int(p) for p in capability.split("."))
    except ValueError:
        raise PlanError(f"--capability {capability!r}; write it as MAJOR.MINOR, e.g. 8.9") from None
    return DeviceSpec(
        "cuda", f"GPU sm_{major}{minor}", (major, minor), total, total, described=True
    )


def detect_device_spec(device: str = "auto") -> DeviceSpec:
    """This machine: the CUDA GPU the model would use (free memory now), else the CPU."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceSpec("cuda", props.name, (props.major, props.minor), total, free, False)
    if device.startswith("cuda"):
        raise PlanError(f"QDS_DEVICE={device} but no CUDA GPU is visible; describe one or use cpu")
    import psutil

    mem = psutil.virtual_memory()
    return DeviceSpec("cpu", "cpu", None, mem.total, mem.available, False)


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str


def resolve_budget(
    device: DeviceSpec,
    requested: str | int | None,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
) -> Budget:
    if requested not in (None, ""):
        n = parse_bytes(requested)  # type: ignore[arg-type]
        return Budget(n, f"QDS_MEMORY_BUDGET={requested}")
    if device.free_bytes is None or device.total_bytes is None:
        raise PlanError("the device's memory is unknown; set QDS_MEMORY_BUDGET (e.g. 16GB)")
    margin = int(device.total_bytes * margin_fraction)
    what = "memory" if device.described else "free memory"
    return Budget(
        device.free_bytes - margin,
        f"the device's {what} {human(device.free_bytes)} minus a {margin_fraction:.0%} "
        f"safety margin ({human(margin)})",
    )


# --- options per component -----------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to hold one component: unquantized, or a backend and quant type."""

    backend: str
    quant_type: str | None
    bytes: int
    bytes_source: str
    psnr: float  # expected PSNR vs unquantized (dB); inf = unquantized
    adherence: float | None
    quality_measured: bool
    quality_source: str
    seconds: float | None = None  # denoiser only; None: unmeasured (ranked last) or n/a
    speed_source: str = ""
    order: int = 0  # registry order: the last tie-break, so plans are deterministic

    @property
    def label(self) -> str:
        return "unquantized" if self.backend == "none" else f"{self.backend} {self.quant_type}"

    @property
    def quality_key(self) -> tuple[float, int]:
        return (self.psnr, 1 if self.quality_measured else 0)

    @property
    def seconds_key(self) -> float:
        return math.inf if self.seconds is None else self.seconds

    def quality_text(self) -> str:
        if self.backend == "none":
            return "unquantized (reference quality)"
        adherence = f", adherence {self.adherence:.1%}" if self.adherence is not None else ""
        kind = "measured" if self.quality_measured else "UNMEASURED"
        return f"PSNR {self.psnr:.1f} dB{adherence} ({kind}: {self.quality_source})"


@dataclass(frozen=True)
class Rejected:
    option: str
    reason: str


Availability = Callable[[Any, str | None, DeviceInfo, str], str | None]


def registry_availability(
    backend: Any, quant_type: str | None, device: DeviceInfo, dtype: str
) -> str | None:
    return backend.unavailable_reason(quant_type, device, dtype)


def _case(option_backend: str, quant_type: str | None) -> tables.Case:
    return (option_backend, None if option_backend == "none" else quant_type)


def _measured_dtype_matches(arch: str, dtype_bytes: int) -> bool:
    # The GPU runs were bf16; the matrix (embedded) ran fp32 on CPU.
    return (arch == tables.EMBEDDED) == (dtype_bytes == 4)


def quantized_bytes(
    comp: ComponentSpec, arch: str | None, case: tables.Case, dtype_bytes: int
) -> tuple[int, str] | None:
    """Storage of `comp` under `case` from the runs, or None where no run measured the case."""
    if comp.role == "denoiser" and arch is not None and _measured_dtype_matches(arch, dtype_bytes):
        run = tables.DENOISER_RUNS.get(arch, {}).get(case)
        if run is not None:
            return run.storage_bytes, f"measured {arch} storage ({run.source})"
    runs = [(arch_, r) for arch_, cells in tables.DENOISER_RUNS.items() if (r := cells.get(case))]
    if not runs:
        return None
    arch_, run = max(runs, key=lambda ar: ar[1].ratio_vs_bf16)
    why = "the largest measured storage ratio" + (
        f" of {len(runs)} architectures" if len(runs) > 1 else ""
    )
    # Only Linear weights are quantized; the rest (embeddings, norms, biases, convolutions)
    # stays in the compute dtype. A whole-model ratio over-states a Linear-only one (it carries
    # the measured model's own unquantized rest), so this errs on the large side.
    rest = comp.parameters + comp.float_buffers - comp.linear_weights
    linear = math.ceil(run.ratio_vs_bf16 * comp.linear_weights * 2)
    return (
        linear + rest * dtype_bytes + comp.other_buffer_bytes,
        f"Linear weights x 2 bytes x {run.ratio_vs_bf16:.4f} ({why}: {arch_}, {run.source}) "
        f"+ {rest:,} other parameters x {dtype_bytes} bytes",
    )


def expected_quality(case: tables.Case, bits: float) -> tuple[float, float | None, bool, str]:
    """(PSNR, adherence, measured?, source); unmeasured cells rank at the lowest measured
    PSNR of the same nominal width, and below every measured cell (the `measured` flag)."""
    cell = tables.QUALITY_CELLS.get(case)
    if cell is not None:
        return cell.psnr_db, cell.adherence, True, cell.source
    widths = {c: _bits_of(c) for c in tables.QUALITY_CELLS}
    same = [c for c, b in widths.items() if b == bits] or [c for c, b in widths.items() if b < bits]
    pool = same or list(tables.QUALITY_CELLS)
    worst = min(pool, key=lambda c: tables.QUALITY_CELLS[c].psnr_db)
    psnr = tables.QUALITY_CELLS[worst].psnr_db
    return (
        psnr,
        None,
        False,
        (
            f"ranked at the lowest measured {bits:g}-bit PSNR ({worst[0]} {worst[1]}, {psnr} dB, "
            f"{tables.QUALITY}) and below it"
        ),
    )


def _bits_of(case: tables.Case) -> float:
    from quantization.backends import BACKENDS

    backend = BACKENDS.get(case[0])
    return backend.weight_bits(case[1]) if backend is not None else 16.0


def denoiser_seconds(
    arch: str | None, case: tables.Case, device: DeviceSpec
) -> tuple[float | None, str]:
    if device.kind == "cpu":
        run = tables.DENOISER_RUNS[tables.EMBEDDED].get(case)
        if run is None or run.seconds_per_image is None:
            return None, "speed unmeasured on CPU (ranked last on speed)"
        return run.seconds_per_image, (
            f"{run.seconds_per_image:.4f} s per 12-step 32x32 image on the embedded model, CPU "
            f"({run.source}; the CPU ranking for every model)"
        )
    measured = arch if arch in (tables.FLUX_DEV, tables.SD3_MEDIUM) else tables.FLUX_DEV
    run = tables.DENOISER_RUNS[measured].get(case)
    if run is None or run.seconds_per_step is None:
        return None, f"speed unmeasured on GPU for {measured} (ranked last on speed)"
    proxy = "" if measured == arch else f", {measured}'s ranking used for this model"
    return (
        run.seconds_per_step,
        f"{run.seconds_per_step:.4f} s/step on an H200 ({run.source}{proxy})",
    )


def activation_bytes(arch: str | None, denoiser: Option, dtype_bytes: int) -> tuple[int, str]:
    """Measured memory above the weights while generating one image at the default size."""
    case = _case(denoiser.backend, denoiser.quant_type)
    if arch == tables.EMBEDDED:
        cells = tables.DENOISER_RUNS[tables.EMBEDDED]
        run = cells.get(case)
        if run is not None and run.peak_rss_delta_bytes is not None:
            return run.peak_rss_delta_bytes, f"peak RSS delta while generating ({run.source})"
        worst = max(c.peak_rss_delta_bytes or 0 for c in cells.values())
        return (
            worst,
            f"largest peak RSS delta of any measured case ({tables.MATRIX}; this one unmeasured)",
        )
    base, source = tables.anchor_pipeline_activation()
    if arch != tables.FLUX_DEV:
        source += "; borrowed from Flux-dev (same 16-channel VAE, unmeasured for this model)"
    runs = tables.DENOISER_RUNS[arch if arch == tables.SD3_MEDIUM else tables.FLUX_DEV]

    def delta(r: tables.DenoiserRun) -> int:
        return (r.peak_bytes or 0) - (r.after_load_bytes or 0)

    none_delta = delta(runs[("none", None)])
    run = runs.get(case)
    if run is not None and run.peak_bytes is not None:
        extra = max(0, delta(run) - none_delta)
        source += f"; + {human(extra)} this backend's step peak above bf16's ({run.source})"
    else:
        extra = max(max(0, delta(r) - none_delta) for r in runs.values())
        source += f"; + {human(extra)}, the largest step-peak excess of any measured backend"
    total = base + extra
    if dtype_bytes == 4:
        total *= 2
        source += "; x2 for float32 compute (activations are held in the compute dtype; unmeasured)"
    return total, source


def component_options(
    comp: ComponentSpec,
    arch: str | None,
    device: DeviceSpec,
    dtype_name: str,
    dtype_bytes: int,
    floor: float,
    available: Availability,
) -> tuple[list[Option], list[Rejected]]:
    """Every way to hold `comp` that auto may pick, and why each other one is left out."""
    from quantization.backends import BACKENDS

    dtype_label = "float32" if dtype_bytes == 4 else dtype_name
    none_seconds, none_speed = (
        denoiser_seconds(arch, ("none", None), device) if comp.role == "denoiser" else (None, "")
    )
    options = [
        Option(
            "none",
            None,
            comp.unquantized_bytes(dtype_bytes),
            f"{comp.parameters:,} parameters from its config x {dtype_bytes} bytes ({dtype_label})",
            math.inf,
            tables.UNQUANTIZED_ADHERENCE.adherence,
            True,
            tables.QUALITY,
            none_seconds,
            none_speed,
        )
    ]
    rejected: list[Rejected] = []
    for order, backend in enumerate(BACKENDS.values(), start=1):
        if backend.key == "none" or not getattr(backend, "quantizes", True):
            continue
        for qtype in backend.quant_types or (None,):
            label = f"{backend.key} {qtype}"
            if comp.library == "transformers" and not backend.supports_text_encoders:
                rejected.append(
                    Rejected(label, f"{backend.key} cannot quantize transformers models")
                )
                continue
            if backend.key == "gguf":
                rejected.append(
                    Rejected(
                        label,
                        "GGUF loads a pre-converted file (qdserve convert-gguf), it does not "
                        "quantize while loading; auto does not convert files",
                    )
                )
                continue
            if reason := available(backend, qtype, device.info, dtype_name):
                rejected.append(Rejected(label, f"cannot run here: {reason}"))
                continue
            case = (backend.key, qtype)
            sized = quantized_bytes(comp, arch, case, dtype_bytes)
            if sized is None:
                rejected.append(
                    Rejected(
                        label,
                        "storage never measured (no recorded run): auto only picks measured cells",
                    )
                )
                continue
            psnr, adherence, measured, qsource = expected_quality(case, backend.weight_bits(qtype))
            if psnr < floor:
                rejected.append(
                    Rejected(
                        label,
                        f"expected PSNR {psnr:.1f} dB ({qsource}) is below the quality floor "
                        f"{floor:.1f} dB",
                    )
                )
                continue
            seconds, speed = (
                denoiser_seconds(arch, case, device) if comp.role == "denoiser" else (None, "")
            )
            options.append(
                Option(
                    backend.key,
                    qtype,
                    sized[0],
                    sized[1],
                    psnr,
                    adherence,
                    measured,
                    qsource,
                    seconds,
                    speed,
                    order,
                )
            )
    return options, _grouped(rejected)


def _grouped(rejected: list[Rejected]) -> list[Rejected]:
    """One line per backend and reason: `gguf Q8_0/Q5_1/...: same reason`."""
    merged: dict[tuple[str, str], list[str]] = {}
    for r in rejected:
        backend, _, qtype = r.option.partition(" ")
        merged.setdefault((backend, r.reason), []).append(qtype)
    return [Rejected(f"{b} {'/'.join(q)}", reason) for (b, reason), q in merged.items()]


def _prune(options: list[Option]) -> list[Option]:
    """Drop options another option beats or ties on size, quality and speed at once."""
    kept = []
    for a in options:
        beaten = any(
            b is not a
            and b.bytes <= a.bytes
            and b.quality_key >= a.quality_key
            and b.seconds_key <= a.seconds_key
            and (
                (b.bytes, b.quality_key, b.seconds_key) != (a.bytes, a.quality_key, a.seconds_key)
                or b.order < a.order
            )
            for b in options
        )
        if not beaten:
            kept.append(a)
    return kept


# --- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    role: Role
    library: str
    class_name: str
    parameters: int
    choice: Option
    reason: str
    alternatives: tuple[Rejected, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.choice.backend != "none"


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    device: DeviceSpec
    budget: Budget
    priority: str
    floor: float
    compute_dtype: str
    components: tuple[ComponentPlan, ...]
    weights_bytes: int
    activation_bytes: int
    activation_source: str
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def quant_choices(self) -> dict[str, tuple[str, str | None]]:
        """component -> (backend, quant type), quantized components only: what the loader maps."""
        return {
            c.name: (c.choice.backend, c.choice.quant_type) for c in self.components if c.quantized
        }

    def summary(self) -> str:
        parts = [
            f"{c.name}={c.choice.label}"
            for c in self.components
            if c.role in ("denoiser", "text_encoder")
        ]
        return f"{', '.join(parts)}; {human(self.total_bytes)} of {human(self.budget.bytes)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.model,
            "architecture": self.model.arch,
            "architecture_note": self.model.arch_note,
            "device": {
                "kind": self.device.kind,
                "name": self.device.name,
                "capability": ".".join(map(str, self.device.capability))
                if self.device.capability
                else None,
                "total_bytes": self.device.total_bytes,
                "described": self.device.described,
            },
            "budget_bytes": self.budget.bytes,
            "budget_source": self.budget.source,
            "priority": self.priority,
            "quality_floor_psnr_db": self.floor,
            "compute_dtype": self.compute_dtype,
            "weights_bytes": self.weights_bytes,
            "activation_bytes": self.activation_bytes,
            "activation_source": self.activation_source,
            "total_bytes": self.total_bytes,
            "components": {
                c.name: {
                    "role": c.role,
                    "class": c.class_name,
                    "parameters": c.parameters,
                    "backend": c.choice.backend,
                    "quant_type": c.choice.quant_type,
                    "bytes": c.choice.bytes,
                    "bytes_source": c.choice.bytes_source,
                    "expected_psnr_db": None if math.isinf(c.choice.psnr) else c.choice.psnr,
                    "expected_adherence": c.choice.adherence,
                    "quality_measured": c.choice.quality_measured,
                    "quality_source": c.choice.quality_source,
                    "seconds": c.choice.seconds,
                    "speed_source": c.choice.speed_source,
                    "reason": c.reason,
                    "rejected": [{"option": r.option, "reason": r.reason} for r in c.alternatives],
                }
                for c in self.components
            },
            "notes": list(self.notes),
        }

    def render(self) -> str:
        m = self.model
        lines = [
            f"model:    {m.model} ({m.pipeline_class}); {m.arch_note}",
            f"device:   {self.device.label}; compute dtype {self.compute_dtype}",
            f"budget:   {human(self.budget.bytes)} ({self.budget.source})",
            f"priority: {self.priority}; quality floor {self.floor:.1f} dB PSNR",
            f"plan:     {human(self.total_bytes)} = weights {human(self.weights_bytes)} + "
            f"activation peak {human(self.activation_bytes)} at {m.default_size}x{m.default_size}",
            f"          activation: {self.activation_source}",
            "",
        ]
        for c in self.components:
            lines.append(
                f"{c.name} ({c.class_name}, {c.parameters:,} parameters): {c.choice.label}, "
                f"{human(c.choice.bytes)}"
            )
            lines.append(f"    why: {c.reason}")
            for r in c.alternatives:
                lines.append(f"    - not {r.option}: {r.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class NoPlanFits(PlanError):
    """Nothing fits the budget; `smallest` is the smallest plan there is."""

    def __init__(self, message: str, smallest_bytes: int) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


def _resolve_dtype(compute_dtype: str, device: DeviceSpec) -> tuple[str, int]:
    if compute_dtype == "auto":
        return ("bfloat16", 2) if device.kind == "cuda" else ("float32", 4)
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if compute_dtype not in sizes:
        raise PlanError(f"compute dtype {compute_dtype!r}; allowed: auto, {', '.join(sizes)}")
    return compute_dtype, sizes[compute_dtype]


def _rank_key(
    priority: str, quality: tuple[Any, ...], seconds: float, total: int, order: tuple[int, ...]
) -> tuple[Any, ...]:
    """Larger is better. Quality is leximin: the worst component's expected quality first."""
    neg_order = tuple(-o for o in order)
    if priority == "speed":
        return (-seconds, quality, -total, neg_order)
    if priority == "memory":
        return (-total, quality, -seconds, neg_order)
    return (quality, -seconds, -total, neg_order)


def make_plan(
    spec: ModelSpec,
    device: DeviceSpec,
    budget: Budget,
    priority: str = "quality",
    floor: float = tables.DEFAULT_PSNR_FLOOR,
    compute_dtype: str = "auto",
    available: Availability = registry_availability,
) -> Plan:
    """The best plan that fits, or NoPlanFits naming the smallest plan's size."""
    if priority not in PRIORITIES:
        raise PlanError(f"QDS_PRIORITY={priority!r}; allowed: {', '.join(PRIORITIES)}")
    dtype_name, dtype_bytes = _resolve_dtype(compute_dtype, device)
    chosen_for = [c for c in spec.components if c.role in ("denoiser", "text_encoder")]
    fixed = [c for c in spec.components if c not in chosen_for]
    fixed_bytes = sum(c.unquantized_bytes(dtype_bytes) for c in fixed)

    all_options: dict[str, list[Option]] = {}
    refused: dict[str, list[Rejected]] = {}
    for comp in chosen_for:
        all_options[comp.name], refused[comp.name] = component_options(
            comp, spec.arch, device, dtype_name, dtype_bytes, floor, available
        )
    den_name = next(c.name for c in chosen_for if c.role == "denoiser")
    activation_cache: dict[tuple[str, str | None], tuple[int, str]] = {}

    def activation(den: Option) -> tuple[int, str]:
        key = (den.backend, den.quant_type)
        if key not in activation_cache:
            activation_cache[key] = activation_bytes(spec.arch, den, dtype_bytes)
        return activation_cache[key]

    def evaluate(choice: dict[str, Option]) -> tuple[int, tuple[Any, ...]]:
        den = choice[den_name]
        total = fixed_bytes + sum(o.bytes for o in choice.values()) + activation(den)[0]
        quality = tuple(sorted(o.quality_key for o in choice.values()))
        order = tuple(choice[c.name].order for c in chosen_for)
        return total, _rank_key(priority, quality, den.seconds_key, total, order)

    names = [c.name for c in chosen_for]
    pruned = [_prune(all_options[n]) for n in names]
    best: tuple[tuple[Any, ...], dict[str, Option]] | None = None
    smallest: tuple[int, dict[str, Option]] | None = None
    for combo in itertools.product(*pruned):
        choice = dict(zip(names, combo, strict=True))
        total, key = evaluate(choice)
        if smallest is None or total < smallest[0]:
            smallest = (total, choice)
        if total <= budget.bytes and (best is None or key > best[0]):
            best = (key, choice)
    assert smallest is not None
    if best is None:
        total, choice = smallest
        parts = ", ".join(f"{n}={o.label}" for n, o in choice.items())
        raise NoPlanFits(
            f"no plan for {spec.model} fits the memory budget {human(budget.bytes)} "
            f"({budget.source}) on {device.label}: the smallest plan ({parts}) needs "
            f"{human(total)} (weights {human(total - activation(choice[den_name])[0])} + "
            f"activation peak {human(activation(choice[den_name])[0])}). Raise "
            "QDS_MEMORY_BUDGET, use a larger device, or lower the quality floor",
            total,
        )

    _, choice = best
    total, _ = evaluate(choice)
    act, act_source = activation(choice[den_name])
    plans = []
    for comp in spec.components:
        if comp not in chosen_for:
            opt = Option(
                "none",
                None,
                comp.unquantized_bytes(dtype_bytes),
                f"{comp.parameters:,} parameters x {dtype_bytes} bytes",
                math.inf,
                None,
                True,
                "",
            )
            reason = (
                "kept unquantized: auto quantizes the denoiser and text encoders only "
                "(no measurement of a quantized " + comp.role + " exists here)"
            )
            plans.append(
                ComponentPlan(
                    comp.name,
                    comp.role,
                    comp.library,
                    comp.class_name,
                    comp.parameters,
                    opt,
                    reason,
                )
            )
            continue
        plans.append(
            _explain(
                comp,
                choice,
                all_options[comp.name],
                refused[comp.name],
                evaluate,
                budget,
                priority,
            )
        )
    notes = [
        "expected quality: PSNR and adherence of the demo model (docs/quality.md, CPU, denoiser "
        "quantized alone); text encoders are ranked with the same numbers, unmeasured for them",
    ]
    if device.kind == "cuda":
        notes.append(
            "GPU speed: seconds per denoiser step on an H200 (docs/benchmarks/gpu.md); text "
            "encoder speed is not measured and does not enter the ranking"
        )
    return Plan(
        model=spec,
        device=device,
        budget=budget,
        priority=priority,
        floor=floor,
        compute_dtype=dtype_name,
        components=tuple(plans),
        weights_bytes=total - act,
        activation_bytes=act,
        activation_source=act_source,
        notes=tuple(notes),
    )


def _explain(
    comp: ComponentSpec,
    choice: dict[str, Option],
    options: list[Option],
    refused: list[Rejected],
    evaluate: Callable[[dict[str, Option]], tuple[int, tuple[Any, ...]]],
    budget: Budget,
    priority: str,
) -> ComponentPlan:
    """Why this component got its option: every other option swapped into the chosen plan."""
    chosen = choice[comp.name]
    alternatives: list[Rejected] = []
    displaced_by_budget = False
    for other in options:
        if other is chosen:
            continue
        total, _ = evaluate({**choice, comp.name: other})
        if total > budget.bytes:
            if other.quality_key > chosen.quality_key:
                displaced_by_budget = True
            alternatives.append(
                Rejected(
                    other.label,
                    f"{human(other.bytes)}: the plan would need {human(total)} > budget "
                    f"{human(budget.bytes)}",
                )
            )
        else:
            alternatives.append(Rejected(other.label, _ranks_lower(chosen, other, priority)))
    alternatives += refused
    speed = f"; speed {chosen.speed_source}" if chosen.speed_source else ""
    if chosen.backend == "none":
        head = "unquantized: the plan fits with it, and nothing beats unquantized on quality"
        if priority != "quality":
            head = f"unquantized: ranks first for priority {priority} among plans that fit"
    else:
        why = {
            "quality": "the best expected quality with which the whole plan fits the budget"
            if displaced_by_budget
            else "ranks first on quality, then speed, among the options that fit",
            "speed": "the fastest measured denoiser option that fits, then quality",
            "memory": "the smallest option above the quality floor, then quality",
        }[priority]
        head = f"{chosen.label}: {why}"
    size = f"size {human(chosen.bytes)} ({chosen.bytes_source})"
    reason = f"{head}. {size}; quality {chosen.quality_text()}{speed}"
    return ComponentPlan(
        comp.name,
        comp.role,
        comp.library,
        comp.class_name,
        comp.parameters,
        chosen,
        reason,
        tuple(alternatives),
    )


def _ranks_lower(chosen: Option, other: Option, priority: str) -> str:
    def quality(o: Option) -> str:
        return (
            "unquantized"
            if o.backend == "none"
            else (f"{o.psnr:.1f} dB {'measured' if o.quality_measured else 'unmeasured'}")
        )

    def speed(o: Option) -> str:
        return "unmeasured" if o.seconds is None else f"{o.seconds:.4f} s"

    q = f"quality {quality(other)} vs {quality(chosen)}"
    s = f"speed {speed(other)} vs {speed(chosen)}"
    m = f"size {human(other.bytes)} vs {human(chosen.bytes)}"
    if other.quality_key < chosen.quality_key:
        if priority == "quality":
            return f"fits, lower expected quality: {q}"
        return f"fits, ranks lower: {q}" + (
            f"; {s}" if other.seconds_key != chosen.seconds_key else ""
        )
    if other.quality_key == chosen.quality_key:
        if other.seconds_key > chosen.seconds_key:
            return f"fits, same expected quality, slower: {s}"
        if other.bytes > chosen.bytes:
            return f"fits, same expected quality, larger: {m}"
        if other.seconds_key == chosen.seconds_key and other.bytes == chosen.bytes:
            return "fits, ties on every ranking key; the earlier backend in the registry was kept"
    if priority == "speed" and other.seconds_key > chosen.seconds_key:
        return f"fits, slower: {s}"
    if priority == "memory" and other.bytes > chosen.bytes:
        return f"fits, larger: {m}"
    # Better on this component alone, but the whole plan ranks lower (leximin quality: another
    # component's worse option is the plan's weakest link, or the plan is slower overall).
    return f"fits, but the whole plan then ranks lower ({q}; {s}; {m})"


# --- from settings / the command line ------------------------------------------------------


def plan_model(
    model: str,
    device: DeviceSpec,
    budget: str | int | None = None,
    priority: str = "quality",
    floor: float = tables.DEFAULT_PSNR_FLOOR,
    compute_dtype: str = "auto",
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    display: str | None = None,
) -> Plan:
    spec = read_model_spec(model, display=display)
    return make_plan(
        spec,
        device,
        resolve_budget(device, budget, margin_fraction),
        priority,
        floor,
        compute_dtype,
    )


def plan_request(
    model: str | None = None,
    device: str | None = None,
    capability: str | None = None,
    memory: str | None = None,
    budget: str | None = None,
    priority: str | None = None,
    floor: float | None = None,
    environ: Mapping[str, str] | None = None,
    display: str | None = None,
) -> Plan:
    """`qdserve plan`: each flag, else its QDS_* variable, else the default.

    No `--capability` / `--memory` plans for this machine (`--device cpu` for its CPU); with
    them, for the described device.
    """
    env = os.environ if environ is None else environ
    if capability is None and memory is None:
        spec = detect_device_spec(device or env.get("QDS_DEVICE", "auto"))
    else:
        spec = describe_device(device or "cuda", capability, memory)
    return plan_model(
        model or env.get("QDS_MODEL", "embedded"),
        spec,
        budget or env.get("QDS_MEMORY_BUDGET") or None,
        priority or env.get("QDS_PRIORITY", "quality"),
        floor
        if floor is not None
        else float(env.get("QDS_QUALITY_FLOOR_PSNR", tables.DEFAULT_PSNR_FLOOR)),
        env.get("QDS_COMPUTE_DTYPE", "auto"),
        display=display,
    )


def plan_for_load(
    model_id: str,
    source: str,
    device: str,
    memory_budget: str | int | None,
    priority: str,
    floor: float,
    compute_dtype: str,
) -> Plan:
    """The loader's `QDS_QUANT_BACKEND=auto` step: plan for the device the model will run on."""
    spec = read_model_spec(source, display=model_id)
    dev = detect_device_spec(device)
    return make_plan(spec, dev, resolve_budget(dev, memory_budget), priority, floor, compute_dtype)


def quant_mapping(plan: Plan, request: Callable[[str | None], Any]) -> dict[str, Any]:
    """component -> diffusers / transformers quantization config for each quantized choice.

    `request(quant_type)` builds the backend's ConfigRequest (the loader knows the dtype, the
    device and the modules left unconverted). The result is a `quant_mapping` for diffusers'
    PipelineQuantizationConfig: each component carries its own backend's config.
    """
    from quantization.backends import get_backend

    mapping: dict[str, Any] = {}
    for comp in plan.components:
        if not comp.quantized:
            continue
        backend = get_backend(comp.choice.backend)
        req = request(comp.choice.quant_type)
        if comp.library == "diffusers":
            mapping[comp.name] = backend.diffusers_config(req)
        else:
            mapping[comp.name] = backend.transformers_config(req)
    return mapping


def auto_quantization(
    settings: Any, model_id: str, source: str, device: str, dtype: Any
) -> tuple[Plan, dict[str, Any]]:
    """`QDS_QUANT_BACKEND=auto` for the loader: the plan for `settings` on `device`, and the
    per-component quant_mapping that loads it (each component with its own backend's config)."""
    from quantization.backends import ConfigRequest

    plan = plan_for_load(
        model_id,
        source,
        device,
        settings.memory_budget,
        settings.priority,
        settings.quality_floor_psnr,
        settings.compute_dtype,
    )
    mapping = quant_mapping(
        plan,
        lambda quant_type: ConfigRequest(
            quant_type=quant_type,
            compute_dtype=dtype,
            modules_to_not_convert=tuple(settings.modules_to_not_convert),
            bnb_double_quant=settings.bnb_double_quant,
            device=device,
        ),
    )
    return plan, mapping


def plan_card(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a plan (`Plan.to_dict()`) that `GET /v1/models` shows."""
    return {
        "priority": plan["priority"],
        "budget_bytes": plan["budget_bytes"],
        "total_bytes": plan["total_bytes"],
        "activation_bytes": plan["activation_bytes"],
        "components": {
            name: {k: c[k] for k in ("backend", "quant_type", "bytes")}
            for name, c in plan["components"].items()
        },
    }
