"""SDNQ specifics on the embedded model on CPU (every type also runs through the registry-wide
tests in tests/backends/test_loading.py: load, storage, closeness, text encoders, qdserve quantize).

Measured here (sdnq 0.2.8, random-weight embedded model, fp32 transformer of 9.24 M
parameters): SDNQ keeps Flux's embedders, norm_out and proj_out unquantized (8.5 % of the
parameters), so int8 stores 0.316 of fp32 (floor 0.25) and uint4 0.228 (floor 0.125).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generate import GenerationRequest, generate
from pipelines.loader import LoadedPipeline, load_pipeline
from pipelines.prequantize import quantize_and_save
from quantization.backends import ConfigRequest, get_backend
from quantization.settings import QuantSettings

PROMPT = GenerationRequest(prompt="a red circle on the left", seed=7, num_inference_steps=2)


def _pixels(loaded: LoadedPipeline) -> np.ndarray:
    return np.asarray(generate(loaded, PROMPT).images[0]).astype(np.float64)


@pytest.fixture(scope="module")
def sdnq_int8(embedded_path: Path) -> LoadedPipeline:
    return load_pipeline(
        QuantSettings(model=str(embedded_path), quant_backend="sdnq", quant_type="int8")
    )


def test_int8_stores_real_bytes_and_stays_close(
    embedded_path: Path, sdnq_int8: LoadedPipeline
) -> None:
    base = load_pipeline(QuantSettings(model=str(embedded_path)))
    t, ref = sdnq_int8.components["transformer"], base.components["transformer"]
    assert t.quantized and not sdnq_int8.components["vae"].quantized
    # Same logical parameters although SDNQ adds scale parameters to every layer.
    assert t.parameters == ref.parameters
    assert 0.30 <= t.storage_bytes / ref.storage_bytes <= 0.33
    image = _pixels(sdnq_int8)
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert np.abs(image - _pixels(base)).mean() <= 1.5
    assert (sdnq_int8.backend, sdnq_int8.quant_type) == ("sdnq", "int8")


def test_uint4_halves_int8_storage_of_quantized_layers(embedded_path: Path) -> None:
    loaded = load_pipeline(
        QuantSettings(model=str(embedded_path), quant_backend="sdnq", quant_type="uint4")
    )
    t = loaded.components["transformer"]
    assert 0.21 <= t.storage_bytes / t.unquantized_bytes <= 0.24


def test_folder_saved_by_plain_diffusers_reloads_as_sdnq(
    tmp_path: Path, sdnq_int8: LoadedPipeline
) -> None:
    sdnq_int8.pipeline.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "qdserve.json").exists()
    config = json.loads((tmp_path / "plain" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sdnq"
    # storage.py's count is the real size: the saved file holds the same bytes (+ header).
    saved = sum(
        f.stat().st_size for f in (tmp_path / "plain" / "transformer").glob("*.safetensors")
    )
    stored = sdnq_int8.components["transformer"].storage_bytes
    assert stored <= saved <= stored * 1.01
    reloaded = load_pipeline(QuantSettings(model=str(tmp_path / "plain")))
    assert (reloaded.backend, reloaded.quant_type, reloaded.pre_quantized) == ("sdnq", "int8", True)
    assert reloaded.components["transformer"].quantized
    assert not reloaded.components["vae"].quantized


def test_cpu_load_defaults_sdnq_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDNQ_USE_TORCH_COMPILE", raising=False)
    get_backend("sdnq")._kwargs(ConfigRequest("int8", torch.float32, device="cpu"))
    assert os.environ["SDNQ_USE_TORCH_COMPILE"] == "0"
    monkeypatch.setenv("SDNQ_USE_TORCH_COMPILE", "1")  # the operator's choice stands
    get_backend("sdnq")._kwargs(ConfigRequest("int8", torch.float32, device="cpu"))
    assert os.environ["SDNQ_USE_TORCH_COMPILE"] == "1"


def test_sdnq_types_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match="QDS_QUANT_TYPE='nf4' is not a quant type of backend"
    ):
        QuantSettings(quant_backend="sdnq", quant_type="nf4")
    assert QuantSettings(quant_backend="sdnq").resolved_quant_type == "int8"


@pytest.mark.slow  # a fresh interpreter: about 20 s on 2 busy cores
def test_saved_sdnq_text_encoder_loads_quantized_in_a_fresh_process(
    embedded_path: Path, tmp_path: Path
) -> None:
    # transformers reads SDNQ only once sdnq is imported; diffusers imports it only for its
    # own components, so a folder whose one SDNQ component is a text encoder needs the hook.
    out = quantize_and_save(
        QuantSettings(
            model=str(embedded_path),
            quant_backend="sdnq",
            components_to_quantize=["text_encoder_2"],
        ),
        tmp_path / "te-only",
    )
    code = (
        "import json, sys; from pipelines.loader import load_pipeline; "
        "from quantization.settings import QuantSettings; "
        "c = load_pipeline(QuantSettings(model=sys.argv[1])).components['text_encoder_2']; "
        "print(json.dumps([c.quantized, c.storage_bytes / c.unquantized_bytes]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    quantized, ratio = json.loads(proc.stdout.strip().splitlines()[-1])
    assert quantized and ratio < 0.6  # was 1.0: plain Linear layers, weights misread
