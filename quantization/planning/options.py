"""Every way to hold one component (unquantized, or a backend and quant type the registry can
run on the device), each with its size, expected quality and speed from the measured tables and
the source of each number, and the reason for each way left out; the activation peak above the
weights that a denoiser choice brings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantization.environment import DeviceInfo
from quantization.planning import tables
from quantization.planning.devices import DeviceSpec
from quantization.planning.model_spec import ComponentSpec
from quantization.planning.units import human


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
