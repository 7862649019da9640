"""The measured numbers `QDS_QUANT_BACKEND=auto` decides from, each with its source.

Nothing here is estimated: every value is copied from a file this project recorded (or from the
published anchors restated in the design note), and `tests/backends/test_planning.py` re-reads the
recorded JSON files of a checkout and fails if a value here drifts from them. Where a cell was
never measured it is absent; the planner (quantization/planning/) says so and ranks it
conservatively instead of guessing.

Sources (paths relative to the repository root):
- RUN1 = docs/benchmarks/gpu-h200-run1/gpu_bench.json (H200, torch 2.11+cu130, diffusers 0.42.1)
- RUN2_1 / RUN2_2 = docs/benchmarks/gpu-h200-run2/gpu_bench_1.json / gpu_bench_2.json
- RUN3_1 = docs/benchmarks/gpu-h200-run3/gpu_bench_1.json
  (all: the denoiser alone, random weights from the published config, bf16, 1024x1024,
  median seconds per denoiser step, torch.cuda allocated bytes after load and peak)
- MATRIX = docs/benchmarks/matrix.json (CPU, the embedded model with random weights, fp32,
  32x32, 12 steps; storage of the denoiser, peak RSS delta while generating, median seconds)
- QUALITY = docs/quality.md (CPU, the trained demo model, 21 prompts x 2 seeds, 12 steps:
  prompt adherence by the pixel checker, PSNR against the unquantized model)
- ANCHORS = the design note's "Published anchors" (Hugging Face blog "Exploring Quantization
  Backends in Diffusers", FLUX.1-dev full pipeline, 1024x1024, 50 steps, H100 80GB)
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30

RUN1 = "docs/benchmarks/gpu-h200-run1/gpu_bench.json"
RUN2_1 = "docs/benchmarks/gpu-h200-run2/gpu_bench_1.json"
RUN2_2 = "docs/benchmarks/gpu-h200-run2/gpu_bench_2.json"
RUN3_1 = "docs/benchmarks/gpu-h200-run3/gpu_bench_1.json"
MATRIX = "docs/benchmarks/matrix.json"
QUALITY = "docs/quality.md"
ANCHORS = "design note, Published anchors (HF blog, FLUX.1-dev, H100 80GB)"

# The architectures measured here, identified by their denoiser's class and exact parameter
# count (RUN1 `parameters`; MATRIX `denoiser_parameters`).
FLUX_DEV = "flux-dev"
SD3_MEDIUM = "sd3-medium"
EMBEDDED = "embedded"
DENOISER_PARAMETERS: dict[str, tuple[str, int, str]] = {
    FLUX_DEV: ("FluxTransformer2DModel", 11_901_408_320, RUN1),
    SD3_MEDIUM: ("SD3Transformer2DModel", 2_028_328_000, RUN1),
    EMBEDDED: ("FluxTransformer2DModel", 4_898_880, MATRIX),
}

Case = tuple[str, str | None]  # (backend key, quant type); ("none", None) is unquantized


@dataclass(frozen=True)
class DenoiserRun:
    """One measured (architecture, backend, quant type) cell."""

    parameters: int
    storage_bytes: int
    source: str
    seconds_per_step: float | None = None  # GPU: median s / denoiser step at 1024x1024
    after_load_bytes: int | None = None  # GPU: torch.cuda allocated after load
    peak_bytes: int | None = None  # GPU: torch.cuda peak during the timed steps
    seconds_per_image: float | None = None  # CPU (MATRIX): median s / 12-step 32x32 image
    peak_rss_delta_bytes: int | None = None  # CPU (MATRIX): RSS growth while generating

    @property
    def ratio_vs_bf16(self) -> float:
        """Storage / (parameters x 2 bytes): how the matrix and GPU reports define it."""
        return self.storage_bytes / (self.parameters * 2)


_FP = 11_901_408_320
_SP = 2_028_328_000
_EP = 4_898_880

DENOISER_RUNS: dict[str, dict[Case, DenoiserRun]] = {
    FLUX_DEV: {
        ("none", None): DenoiserRun(
            _FP, 23_802_816_640, RUN1, 0.1714, 23_802_855_936, 24_332_525_568
        ),
        ("bitsandbytes_4bit", "nf4"): DenoiserRun(
            _FP, 6_144_698_752, RUN1, 0.1841, 6_145_704_448, 6_657_417_216
        ),
        ("bitsandbytes_8bit", "int8"): DenoiserRun(
            _FP, 11_904_493_696, RUN1, 0.3801, 11_922_039_808, 12_729_338_368
        ),
        ("torchao", "int8wo"): DenoiserRun(
            _FP, 11_935_152_896, RUN1, 0.2320, 11_935_192_576, 12_440_220_672
        ),
        ("quanto", "int8"): DenoiserRun(
            _FP, 11_910_627_552, RUN1, 0.2315, 11_939_492_864, 12_444_258_816
        ),
        ("torchao", "float8dq"): DenoiserRun(
            _FP, 11_904_495_712, RUN1, 0.2763, 11_905_577_472, 13_203_329_536
        ),
        ("quanto", "int4"): DenoiserRun(
            _FP, 6_327_162_976, RUN2_1, 2.1517, 6_365_301_248, 6_891_137_024
        ),
    },
    SD3_MEDIUM: {
        ("none", None): DenoiserRun(_SP, 4_169_902_208, RUN1, 0.0280, 4_197_165_568, 4_367_090_688),
        ("bitsandbytes_4bit", "nf4"): DenoiserRun(
            _SP, 1_161_752_072, RUN1, 0.0512, 1_165_734_912, 1_335_660_032
        ),
        ("bitsandbytes_8bit", "int8"): DenoiserRun(
            _SP, 2_142_775_424, RUN1, 0.1475, 2_168_415_232, 2_445_311_488
        ),
        ("torchao", "int8wo"): DenoiserRun(
            _SP, 2_153_789_184, RUN1, 0.0470, 2_194_422_272, 2_364_347_392
        ),
        ("quanto", "int8"): DenoiserRun(
            _SP, 2_144_979_536, RUN1, 0.0474, 2_158_958_592, 2_328_883_712
        ),
        ("torchao", "float8dq"): DenoiserRun(
            _SP, 2_142_776_784, RUN1, 0.1549, 2_148_717_056, 2_595_466_752
        ),
        ("quanto", "int4"): DenoiserRun(
            _SP, 1_192_561_104, RUN2_2, 0.2398, 1_227_273_728, 1_397_878_784
        ),
        ("gguf", "Q8_0"): DenoiserRun(
            _SP, 2_269_470_848, RUN3_1, 0.0669, 2_334_614_016, 2_539_838_464
        ),
        ("gguf", "Q4_1"): DenoiserRun(
            _SP, 1_382_602_880, RUN3_1, 0.0810, 1_402_264_064, 1_572_189_184
        ),
        ("gguf", "Q4_0"): DenoiserRun(
            _SP, 1_255_907_456, RUN3_1, 0.0821, 1_255_907_840, 1_426_185_216
        ),
    },
    EMBEDDED: {
        ("none", None): DenoiserRun(
            _EP, 19_595_520, MATRIX, seconds_per_image=0.1734, peak_rss_delta_bytes=368_640
        ),
        ("quanto", "int8"): DenoiserRun(
            _EP, 5_012_256, MATRIX, seconds_per_image=0.2221, peak_rss_delta_bytes=749_568
        ),
        ("quanto", "int4"): DenoiserRun(
            _EP, 2_813_472, MATRIX, seconds_per_image=0.2462, peak_rss_delta_bytes=409_600
        ),
        ("quanto", "int2"): DenoiserRun(
            _EP, 1_592_864, MATRIX, seconds_per_image=0.2451, peak_rss_delta_bytes=430_080
        ),
        ("quanto", "float8"): DenoiserRun(
            _EP, 5_012_256, MATRIX, seconds_per_image=0.4182, peak_rss_delta_bytes=2_904_064
        ),
        ("torchao", "int8wo"): DenoiserRun(
            _EP, 5_027_904, MATRIX, seconds_per_image=0.1585, peak_rss_delta_bytes=1_597_440
        ),
        ("torchao", "int8dq"): DenoiserRun(
            _EP, 5_027_904, MATRIX, seconds_per_image=0.2671, peak_rss_delta_bytes=319_488
        ),
        ("torchao", "float8wo"): DenoiserRun(
            _EP, 5_011_968, MATRIX, seconds_per_image=0.3864, peak_rss_delta_bytes=245_760
        ),
        ("gguf", "Q8_0"): DenoiserRun(
            _EP, 5_253_376, MATRIX, seconds_per_image=0.2742, peak_rss_delta_bytes=237_568
        ),
        ("gguf", "Q4_0"): DenoiserRun(
            _EP, 2_812_160, MATRIX, seconds_per_image=0.3333, peak_rss_delta_bytes=704_512
        ),
    },
}


@dataclass(frozen=True)
class QualityCell:
    """QUALITY: PSNR (dB, mean over images, against `none` at the same seed) and adherence."""

    psnr_db: float
    adherence: float
    source: str = QUALITY


# As printed in docs/quality.md (adherence: 41/42 = 97.6%, 40/42 = 95.2%, 39/42 = 92.9%,
# 33/42 = 78.6%); gguf F16 printed identical to `none` and is left out (auto never picks GGUF).
QUALITY_CELLS: dict[Case, QualityCell] = {
    ("quanto", "int8"): QualityCell(60.2, 0.976),
    ("quanto", "float8"): QualityCell(49.9, 0.952),
    ("quanto", "int4"): QualityCell(39.5, 0.976),
    ("quanto", "int2"): QualityCell(24.4, 0.786),
    ("torchao", "int8wo"): QualityCell(61.1, 0.976),
    ("torchao", "int8dq"): QualityCell(58.6, 0.976),
    ("torchao", "float8wo"): QualityCell(49.9, 0.952),
    ("gguf", "Q8_0"): QualityCell(60.9, 0.976),
    ("gguf", "Q5_1"): QualityCell(47.3, 0.976),
    ("gguf", "Q5_0"): QualityCell(46.2, 0.976),
    ("gguf", "Q4_1"): QualityCell(42.1, 0.929),
    ("gguf", "Q4_0"): QualityCell(42.5, 0.952),
    ("gguf", "BF16"): QualityCell(66.0, 0.976),
    ("sdnq", "int8"): QualityCell(60.9, 0.976),
    ("sdnq", "int6"): QualityCell(52.9, 0.976),
    ("sdnq", "uint4"): QualityCell(45.3, 0.976),
    ("sdnq", "int4"): QualityCell(42.8, 0.952),
    ("sdnq", "float8_e4m3fn"): QualityCell(52.7, 0.952),
}
UNQUANTIZED_ADHERENCE = QualityCell(float("inf"), 0.976)  # QUALITY, row `none`


@dataclass(frozen=True)
class AnchorRow:
    """ANCHORS: FLUX.1-dev full pipeline (text encoders and VAE included), 1024x1024."""

    setting: str
    after_load_gb: float
    peak_gb: float
    seconds_50_steps: float

    @property
    def activation_gb(self) -> float:
        return round(self.peak_gb - self.after_load_gb, 3)


ANCHOR_ROWS: tuple[AnchorRow, ...] = (
    AnchorRow("bf16", 31.4, 36.2, 12),
    AnchorRow("bnb nf4", 12.6, 17.3, 12),
    AnchorRow("bnb 8-bit", 19.3, 24.4, 27),
    AnchorRow("torchao int8wo", 17.0, 21.5, 15),
    AnchorRow("torchao int4wo", 10.6, 14.7, 109),
    AnchorRow("quanto int8", 17.3, 21.8, 15),
    AnchorRow("GGUF Q8_0", 21.5, 26.0, 15),
    AnchorRow("GGUF Q4_1", 16.8, 21.3, 23),
)


def anchor_pipeline_activation() -> tuple[int, str]:
    """Bytes the full Flux-dev pipeline adds above its loaded weights at 1024x1024.

    The largest peak-minus-after-load of the published rows (bnb 8-bit, 5.1), read as GiB:
    the blog labels its numbers GB without saying which GB, and GiB is the larger reading,
    so the budget check errs on the safe side.
    """
    row = max(ANCHOR_ROWS, key=lambda r: r.activation_gb)
    source = (
        f"{ANCHORS}: largest peak - after load, {row.setting} "
        f"{row.peak_gb} - {row.after_load_gb} = {row.activation_gb} (read as GiB)"
    )
    return int(row.activation_gb * GIB), source


# The quality floors the planner plans for and the quality guard (pipelines.quality_guard)
# checks a loaded model against.
# Policy drawn from docs/quality.md: quanto int2 measured 24.4 dB, every 4-bit or wider
# backend >= 39.5 dB (33.7 dB on random weights, docs/benchmarks/matrix.md).
DEFAULT_PSNR_FLOOR = 30.0
# docs/quality.md: unquantized 97.6%, int2 78.6%, everything else >= 92.9% (gguf Q4_1).
DEFAULT_ADHERENCE_FLOOR = 0.75
