"""Every backend that runs on CPU: loads the embedded model, saves memory, stays close.

Closeness is the mean absolute difference of 8-bit RGB pixels (0..255) to the unquantized
image at the same seed, on the random-weight embedded model at 32x32, 4 steps. Tolerances
(measured values in brackets, torch 2.13 CPU): int8 <= 1.5 [0.13], float8 <= 4 [0.9],
4-bit <= 8 [2.3], int2 <= 30 [11.3]. Storage ratios are against the fp32 transformer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantization.generate import GenerationRequest, generate, generate_batch
from quantization.gguf_convert import convert_to_gguf
from quantization.loader import LoadedPipeline, load_pipeline
from quantization.prequantize import NotSerializable, quantize_and_save
from quantization.settings import QuantSettings

PROMPT = GenerationRequest(prompt="a red circle on the left", seed=7)


def _pixels(loaded: LoadedPipeline, req: GenerationRequest = PROMPT) -> np.ndarray:
    return np.asarray(generate(loaded, req).images[0]).astype(np.float64)


@pytest.fixture(scope="module")
def baseline(embedded_path: Path) -> np.ndarray:
    return _pixels(load_pipeline(QuantSettings(model=str(embedded_path))))


CPU_CASES = [
    # backend, quant type, max storage ratio vs fp32, min ratio, max mean abs diff
    ("quanto", "int8", 0.30, 0.24, 1.5),
    ("quanto", "float8", 0.30, 0.24, 4.0),
    ("quanto", "int4", 0.16, 0.12, 8.0),
    ("quanto", "int2", 0.10, 0.06, 30.0),
    ("torchao", "int8wo", 0.30, 0.24, 1.5),
    ("torchao", "int8dq", 0.30, 0.24, 1.5),
    ("torchao", "float8wo", 0.30, 0.24, 4.0),
]


@pytest.mark.parametrize(("backend", "qtype", "hi", "lo", "tol"), CPU_CASES)
def test_cpu_backend_loads_quantizes_and_stays_close(
    embedded_path: Path,
    baseline: np.ndarray,
    backend: str,
    qtype: str,
    hi: float,
    lo: float,
    tol: float,
) -> None:
    loaded = load_pipeline(
        QuantSettings(model=str(embedded_path), quant_backend=backend, quant_type=qtype)
    )
    t = loaded.components["transformer"]
    assert t.quantized and not loaded.components["vae"].quantized
    ratio = t.storage_bytes / t.unquantized_bytes
    assert lo <= ratio <= hi, f"{backend} {qtype} storage ratio {ratio:.3f}"
    image = _pixels(loaded)
    assert np.isfinite(image).all() and image.std() > 0
    mad = np.abs(image - baseline).mean()
    assert mad <= tol, f"{backend} {qtype} mean abs diff {mad:.2f} > {tol}"
    assert (loaded.backend, loaded.quant_type) == (backend, qtype)


def test_unquantized_reports_full_storage(embedded_path: Path) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    t = loaded.components["transformer"]
    assert not t.quantized and t.storage_bytes == t.unquantized_bytes == t.parameters * 4
    assert loaded.describe()["backend"] == "none"


@pytest.mark.parametrize(
    ("qtype", "hi", "lo", "tol"), [("Q8_0", 0.30, 0.24, 1.5), ("Q4_0", 0.16, 0.12, 8.0)]
)
def test_gguf_via_converter(
    embedded_path: Path,
    baseline: np.ndarray,
    tmp_path: Path,
    qtype: str,
    hi: float,
    lo: float,
    tol: float,
) -> None:
    gguf_file = convert_to_gguf(embedded_path, tmp_path / f"t-{qtype}.gguf", qtype)
    loaded = load_pipeline(
        QuantSettings(
            model=str(embedded_path), quant_backend="gguf", quant_type=qtype, gguf_file=gguf_file
        )
    )
    t = loaded.components["transformer"]
    assert lo <= t.storage_bytes / t.unquantized_bytes <= hi
    assert (
        t.parameters
        == load_pipeline(QuantSettings(model=str(embedded_path)))
        .components["transformer"]
        .parameters
    )
    assert np.abs(_pixels(loaded) - baseline).mean() <= tol


def test_quantize_text_encoder_too(embedded_path: Path) -> None:
    loaded = load_pipeline(
        QuantSettings(
            model=str(embedded_path),
            quant_backend="quanto",
            components_to_quantize=["denoiser", "text_encoder_2"],
        )
    )
    te = loaded.components["text_encoder_2"]
    assert te.quantized and te.storage_bytes < 0.6 * te.unquantized_bytes
    assert not loaded.components["text_encoder"].quantized


@pytest.mark.parametrize(("backend", "qtype"), [("quanto", "int8"), ("torchao", "int8wo")])
def test_round_trip_pre_quantized(
    embedded_path: Path, tmp_path: Path, backend: str, qtype: str
) -> None:
    settings = QuantSettings(model=str(embedded_path), quant_backend=backend, quant_type=qtype)
    fresh = _pixels(load_pipeline(settings))
    out = quantize_and_save(settings, tmp_path / "pq")
    reloaded = load_pipeline(QuantSettings(model=str(out)))
    assert reloaded.pre_quantized and (reloaded.backend, reloaded.quant_type) == (backend, qtype)
    assert reloaded.components["transformer"].quantized
    assert np.array_equal(_pixels(reloaded), fresh)


def test_none_backend_cannot_be_pre_quantized(embedded_path: Path, tmp_path: Path) -> None:
    with pytest.raises(NotSerializable, match="nothing to pre-quantize"):
        quantize_and_save(QuantSettings(model=str(embedded_path)), tmp_path / "x")


def test_generation_is_deterministic_and_seeds_differ(embedded_path: Path) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    req = GenerationRequest(prompt="a blue square", seed=11, num_images=2)
    a, b = generate(loaded, req), generate(loaded, req)
    assert a.seeds == [11, 12]
    assert a.images[0].size == (32, 32)
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(a.images, b.images, strict=True)
    )
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    single = generate(loaded, GenerationRequest(prompt="a blue square", seed=12))
    diff = np.abs(np.asarray(single.images[0], float) - np.asarray(a.images[1], float)).max()
    assert diff <= 2, "image i of a request equals the image made alone with seed + i"


def test_batch_of_requests_matches_each_alone(embedded_path: Path) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    reqs = [
        GenerationRequest(prompt=p, seed=s) for p, s in [("a red circle", 1), ("a green star", 2)]
    ]
    batched = generate_batch(loaded, reqs)
    for req, res in zip(reqs, batched, strict=True):
        alone = generate(loaded, req).images[0]
        assert np.abs(np.asarray(alone, float) - np.asarray(res.images[0], float)).max() <= 2
    with pytest.raises(ValueError, match="must share size"):
        generate_batch(loaded, [reqs[0], GenerationRequest(prompt="x", width=64, height=64)])


def test_unknown_component_for_model_is_a_load_error(embedded_path: Path) -> None:
    from quantization.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="QDS_COMPONENTS_TO_QUANTIZE names 'text_encoder_3'"):
        load_pipeline(
            QuantSettings(
                model=str(embedded_path),
                quant_backend="quanto",
                components_to_quantize=["text_encoder_3"],
            )
        )


def test_model_folder_without_index_is_refused(tmp_path: Path) -> None:
    from quantization.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"without model_index\.json"):
        load_pipeline(QuantSettings(model=str(tmp_path)))


# --- GPU: the same path for real on CUDA (skipped without it) -------------------------------

GPU_CASES = [
    ("bitsandbytes_4bit", "nf4", 0.17),
    ("bitsandbytes_4bit", "fp4", 0.17),
    ("bitsandbytes_8bit", "int8", 0.30),
    ("torchao", "int8wo", 0.30),
    ("torchao", "float8wo", 0.30),
    ("torchao", "float8dq", 0.30),
    ("quanto", "int8", 0.30),
    # modelopt FP8 / INT8 are refused (see test_modelopt_refuses_on_gpu_with_the_measured_failure):
    # on an H200 they loaded and then failed every forward with diffusers 0.42.1.
]


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "qtype", "max_ratio_vs_fp32"), GPU_CASES)
def test_gpu_backend_loads_and_generates(
    embedded_path: Path, backend: str, qtype: str, max_ratio_vs_fp32: float
) -> None:
    loaded = load_pipeline(
        QuantSettings(
            model=str(embedded_path), quant_backend=backend, quant_type=qtype, device="cuda"
        )
    )
    assert loaded.device == "cuda" and loaded.compute_dtype == torch.bfloat16
    t = loaded.components["transformer"]
    ratio_fp32 = t.storage_bytes / (t.parameters * 4)
    print(f"GPU {backend} {qtype}: storage {t.storage_bytes} B, ratio vs fp32 {ratio_fp32:.3f}")
    assert ratio_fp32 <= max_ratio_vs_fp32
    image = np.asarray(generate(loaded, PROMPT).images[0])
    assert image.shape == (32, 32, 3) and image.std() > 0
