"""Operator tools through the real console entry point, and the embedded model's determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.loader import load_pipeline
from quantization.backends import ModelLoadError
from quantization.settings import QuantSettings

ROOT = Path(__file__).resolve().parents[2]


def _qdserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_convert_gguf_then_serve_settings_accept_it(embedded_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "den-q4.gguf"
    proc = _qdserve("convert-gguf", str(out), "--quant-type", "Q4_0", "--model", str(embedded_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"QDS_GGUF_FILE={out}" in proc.stdout
    loaded = load_pipeline(
        QuantSettings(
            model=str(embedded_path), quant_backend="gguf", quant_type="Q4_0", gguf_file=out
        )
    )
    t = loaded.components["transformer"]
    assert t.quantized and t.storage_bytes < 0.16 * t.unquantized_bytes


def test_convert_gguf_rejects_unwritable_type(embedded_path: Path, tmp_path: Path) -> None:
    proc = _qdserve(
        "convert-gguf",
        str(tmp_path / "x.gguf"),
        "--quant-type",
        "Q4_K",
        "--model",
        str(embedded_path),
    )
    assert proc.returncode == 2
    assert "quant type 'Q4_K' cannot be written; allowed: Q8_0" in proc.stderr


def test_quantize_command_saves_a_pre_quantized_folder(embedded_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    proc = _qdserve(
        "quantize",
        str(out),
        "--backend",
        "quanto",
        "--quant-type",
        "int8",
        "--model",
        str(embedded_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_pipeline(QuantSettings(model=str(out)))
    assert loaded.pre_quantized and loaded.backend == "quanto"


def test_quantize_refuses_gpu_only_backend_on_cpu(embedded_path: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    proc = _qdserve(
        "quantize",
        str(tmp_path / "x"),
        "--backend",
        "bitsandbytes_4bit",
        "--model",
        str(embedded_path),
    )
    assert proc.returncode == 2
    assert "needs an NVIDIA CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_offload_needs_cuda(embedded_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ModelLoadError, match=r"QDS_OFFLOAD=model .* needs QDS_DEVICE=cuda"):
        load_pipeline(QuantSettings(model=str(embedded_path), offload="model"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_generate_on_gpu(embedded_path: Path, mode: str) -> None:
    from pipelines.generate import GenerationRequest, generate

    loaded = load_pipeline(QuantSettings(model=str(embedded_path), offload=mode, device="cuda"))
    image = generate(loaded, GenerationRequest(prompt="a red circle", seed=1)).images[0]
    assert image.size == (32, 32)


def test_embedded_model_is_deterministic() -> None:
    from pipelines.embedded import build_pipeline

    a, b = build_pipeline().transformer.state_dict(), build_pipeline().transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_command_reports_and_exits(tmp_path: Path) -> None:
    """`qdserve warmup` loads the configured model, sets the compile cache under
    QDS_CACHE_DIR and exits 0 with a JSON report; with QDS_COMPILE=false it compiles nothing
    (the real compile into the cache: tests/container/test_image.py and docs/deploy.md)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(QDS_CACHE_DIR=str(tmp_path), QDS_COMPILE="false")
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "warmup"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["compiled"] is False and report["why"] == "QDS_COMPILE=false"
    assert report["cache"] == str(tmp_path / "inductor")
