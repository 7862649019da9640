"""Quality guard (`QDS_QUALITY_CHECK`): probe a freshly loaded model before it is declared ready.

A few fixed prompts at fixed seeds are generated with the quantized pipeline and compared,
pixel for pixel, with the same probes from the unquantized model (or with references recorded
earlier, for when the unquantized model does not fit): PSNR in dB. For the demo model the pixel
checker of examples/demo also says whether each probe shows the prompted shape, colour and
position (adherence). Below the configured floor the model is refused, with the numbers in the
reason, instead of serving bad images.

The checker is the embedded model's own (`pipelines.demo_checker`); for any other model
adherence is not judged and only PSNR decides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.demo_checker import adheres as demo_adheres
from pipelines.seeds import seeded_generators
from quantization.planning.tables import DEFAULT_ADHERENCE_FLOOR, DEFAULT_PSNR_FLOOR

if TYPE_CHECKING:
    from PIL.Image import Image

    from pipelines.loader import LoadedPipeline

# Demo-model captions (pipelines/demo_shapes.py vocabulary): any model can draw them, and the
# demo model's checker can judge them.
PROBE_PROMPTS: tuple[str, ...] = (
    "a red circle on the left",
    "a blue square in the center",
    "a green triangle on the right",
    "a yellow square on the left",
)
PROBE_SEEDS: tuple[int, ...] = (0,)
REFERENCES_META = "references.json"


class QualityRefused(RuntimeError):
    """The loaded model scored below the floor; the message carries the numbers."""

    def __init__(self, report: QualityReport) -> None:
        super().__init__(report.reason)
        self.report = report


@dataclass(frozen=True)
class Probe:
    """What is generated: the same for the model under test and its reference."""

    prompts: tuple[str, ...] = PROBE_PROMPTS
    seeds: tuple[int, ...] = PROBE_SEEDS
    size: int = 32
    steps: int = 12
    guidance: float = 3.5
    max_sequence_length: int | None = None

    def jobs(self) -> list[tuple[str, int]]:
        return [(p, s) for s in self.seeds for p in self.prompts]


@dataclass(frozen=True)
class QualityFloor:
    psnr_db: float = DEFAULT_PSNR_FLOOR
    adherence: float | None = DEFAULT_ADHERENCE_FLOOR


@dataclass(frozen=True)
class QualityReport:
    passed: bool
    psnr_db: float  # mean over the probes of per-image PSNR; inf when every image is identical
    psnr_min_db: float
    adherence: float | None
    reference_adherence: float | None
    probes: int
    reference: str
    floor: QualityFloor
    reason: str

    def describe(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or math.isinf(x) else round(x, 2)

        return {
            "passed": self.passed,
            "psnr_db": num(self.psnr_db),
            "psnr_min_db": num(self.psnr_min_db),
            "identical": math.isinf(self.psnr_db),
            "adherence": self.adherence,
            "reference_adherence": self.reference_adherence,
            "probes": self.probes,
            "reference": self.reference,
            "floor": asdict(self.floor),
            "reason": self.reason,
        }


def probe_for(loaded: LoadedPipeline, steps: int | None = None) -> Probe:
    """The probe at the model's own default size, steps and guidance."""
    d = loaded.defaults
    return Probe(
        size=d.size,
        steps=steps or d.steps,
        guidance=d.guidance,
        max_sequence_length=d.max_sequence_length,
    )


def generate(pipe: Any, probe: Probe) -> list[Image]:
    """The probe images, one CPU generator per image so every device draws the same noise."""
    import torch

    jobs = probe.jobs()
    kwargs: dict[str, Any] = {}
    if probe.max_sequence_length is not None:
        kwargs["max_sequence_length"] = probe.max_sequence_length
    with torch.no_grad():
        out = pipe(
            [p for p, _ in jobs],
            height=probe.size,
            width=probe.size,
            num_inference_steps=probe.steps,
            guidance_scale=probe.guidance,
            generator=seeded_generators([s for _, s in jobs]),
            **kwargs,
        )
    return list(out.images)


def psnr(a: Image, b: Image) -> float:
    """PSNR in dB on the 0-255 scale; inf for identical images."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"probe image sizes differ: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def demo_checker() -> Any | None:
    """The embedded model's pixel checker `adheres(image, prompt)`."""
    return demo_adheres


def adherence(images: Sequence[Image], probe: Probe) -> float | None:
    adheres = demo_checker()
    if adheres is None:
        return None
    jobs = probe.jobs()
    return sum(bool(adheres(img, p)) for img, (p, _) in zip(images, jobs, strict=True)) / len(jobs)


def compare(
    images: Sequence[Image],
    references: Sequence[Image],
    probe: Probe,
    floor: QualityFloor,
    reference: str,
    judge_adherence: bool,
) -> QualityReport:
    """PSNR (and adherence) of `images` against `references`, judged against `floor`."""
    if len(images) != len(references):
        raise ValueError(f"{len(images)} probe images but {len(references)} references")
    values = [psnr(a, b) for a, b in zip(images, references, strict=True)]
    mean = math.inf if all(math.isinf(v) for v in values) else _finite_mean(values)
    low = min(values)
    got = adherence(images, probe) if judge_adherence else None
    ref_adh = adherence(references, probe) if got is not None else None
    failures = []
    if mean < floor.psnr_db:
        failures.append(
            f"PSNR {mean:.1f} dB (lowest {low:.1f} dB) is below the floor {floor.psnr_db:.1f} dB"
        )
    if got is not None and floor.adherence is not None and got < floor.adherence:
        failures.append(
            f"prompt adherence {got:.0%} (reference {ref_adh:.0%}) is below the floor "
            f"{floor.adherence:.0%}"
        )
    n = len(values)
    psnr_text = "identical images" if math.isinf(mean) else f"PSNR {mean:.1f} dB (lowest {low:.1f})"
    adh_text = f", adherence {got:.0%}" if got is not None else ""
    where = f"{n} probe images against {reference}"
    if failures:
        reason = f"quality check failed on {where}: " + "; ".join(failures)
    else:
        reason = f"quality check passed on {where}: {psnr_text}{adh_text}"
    return QualityReport(not failures, mean, low, got, ref_adh, n, reference, floor, reason)


def _finite_mean(values: list[float]) -> float:
    # An identical image has no finite PSNR; count it at the best finite value seen so the mean
    # stays finite and is not inflated beyond what was measured.
    best = max(v for v in values if not math.isinf(v))
    return sum(best if math.isinf(v) else v for v in values) / len(values)


def is_demo_model(loaded: LoadedPipeline) -> bool:
    """The shipped demo model (trained shapes), the only one the pixel checker can judge."""
    meta = Path(loaded.model_path) / "qdserve.json"
    if not meta.is_file():
        return False
    return str(json.loads(meta.read_text()).get("version", "")).startswith("demo")


def check_against_model(
    loaded: LoadedPipeline,
    reference: LoadedPipeline,
    floor: QualityFloor = QualityFloor(),
    probe: Probe | None = None,
) -> QualityReport:
    """Probe `loaded` and the unquantized `reference` with the same prompts and seeds."""
    probe = probe or probe_for(loaded)
    return compare(
        generate(loaded.pipeline, probe),
        generate(reference.pipeline, probe),
        probe,
        floor,
        f"the unquantized model ({reference.model}, {reference.backend})",
        is_demo_model(loaded),
    )


def record_references(reference: LoadedPipeline, folder: Path, probe: Probe | None = None) -> Path:
    """Save the unquantized model's probe images so a later check needs no unquantized load."""
    probe = probe or probe_for(reference)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(generate(reference.pipeline, probe)):
        name = f"probe-{i:02d}.png"
        image.save(folder / name)
        names.append(name)
    meta = {"model": reference.model, "probe": asdict(probe), "images": names}
    (folder / REFERENCES_META).write_text(json.dumps(meta, indent=2))
    return folder


def check_against_references(
    loaded: LoadedPipeline, folder: Path, floor: QualityFloor = QualityFloor()
) -> QualityReport:
    """Probe `loaded` with the prompts, seeds and settings the references were recorded with."""
    from PIL import Image as PILImage

    meta_path = folder / REFERENCES_META
    if not meta_path.is_file():
        raise ValueError(f"{folder} holds no {REFERENCES_META}; record references first")
    meta = json.loads(meta_path.read_text())
    p = meta["probe"]
    probe = Probe(
        prompts=tuple(p["prompts"]),
        seeds=tuple(p["seeds"]),
        size=p["size"],
        steps=p["steps"],
        guidance=p["guidance"],
        max_sequence_length=p["max_sequence_length"],
    )
    references = [PILImage.open(folder / name).convert("RGB") for name in meta["images"]]
    return compare(
        generate(loaded.pipeline, probe),
        references,
        probe,
        floor,
        f"references recorded from {meta['model']} in {folder}",
        is_demo_model(loaded),
    )


def enforce(report: QualityReport) -> QualityReport:
    """Raise QualityRefused when the report failed; return it otherwise."""
    if not report.passed:
        raise QualityRefused(report)
    return report


def guard(loaded: LoadedPipeline, settings: Any, load: Any) -> QualityReport | None:
    """The loader's `QDS_QUALITY_CHECK` step: None when off or nothing is quantized; else the
    report (kept on the loaded pipeline), raising QualityRefused below the floor.

    `load(settings)` loads the unquantized reference when no references folder is configured;
    it is released again before this returns.
    """
    if not getattr(settings, "quality_check", False):
        return None
    if not any(c.quantized for c in loaded.components.values()):
        return None
    floor = QualityFloor(
        psnr_db=float(getattr(settings, "quality_floor_psnr", DEFAULT_PSNR_FLOOR)),
        adherence=getattr(settings, "quality_floor_adherence", DEFAULT_ADHERENCE_FLOOR) or None,
    )
    folder = getattr(settings, "quality_references", None)
    if folder is not None:
        report = check_against_references(loaded, Path(folder), floor)
    elif loaded.pre_quantized:
        raise QualityRefused(
            QualityReport(
                False,
                math.nan,
                math.nan,
                None,
                None,
                0,
                "nothing",
                floor,
                "QDS_QUALITY_CHECK on a pre-quantized folder needs QDS_QUALITY_REFERENCES: the "
                "unquantized model to compare with is not in it",
            )
        )
    else:
        # Nothing is quantized in the reference, so its own load skips this check.
        reference = load(settings.with_backend("none"))
        try:
            report = check_against_model(loaded, reference, floor)
        finally:
            reference.release()
    loaded.extra["quality"] = report.describe()
    return enforce(report)
