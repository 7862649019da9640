"""The backend registry: diffusers' keys, real config objects, and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.loader import load_pipeline
from quantization.backends import BACKENDS, BackendUnavailable, ConfigRequest, get_backend
from quantization.environment import DeviceInfo
from quantization.settings import QuantSettings

CPU = DeviceInfo(False, "cpu")
AMPERE = DeviceInfo(True, "NVIDIA A100", (8, 0))
HOPPER = DeviceInfo(True, "NVIDIA H100", (9, 0))


def test_keys_are_diffusers_quantizer_keys() -> None:
    from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert set(BACKENDS) - {"none"} <= set(AUTO_QUANTIZER_MAPPING)
    assert all(key == backend.key for key, backend in BACKENDS.items())


def test_listing_order_is_stable() -> None:
    # none first, then the original backends in their order; later ones after them.
    first = ["none", "bitsandbytes_4bit", "bitsandbytes_8bit", "gguf", "quanto", "torchao"]
    assert list(BACKENDS)[: len(first) + 1] == [*first, "modelopt"]
    assert "sdnq" in BACKENDS


def test_configs_are_diffusers_and_transformers_classes() -> None:
    import diffusers
    import transformers

    req = ConfigRequest(quant_type=None, compute_dtype=torch.bfloat16)
    cfg = get_backend("bitsandbytes_4bit").diffusers_config(req)
    assert isinstance(cfg, diffusers.BitsAndBytesConfig)
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert isinstance(
        get_backend("bitsandbytes_4bit").transformers_config(req), transformers.BitsAndBytesConfig
    )
    assert get_backend("bitsandbytes_8bit").diffusers_config(req).load_in_8bit
    q = get_backend("quanto").diffusers_config(ConfigRequest("int4", torch.float32))
    assert isinstance(q, diffusers.QuantoConfig) and q.weights_dtype == "int4"
    assert isinstance(get_backend("gguf").diffusers_config(req), diffusers.GGUFQuantizationConfig)


@pytest.mark.parametrize(
    ("qtype", "cls"),
    [
        ("int8wo", "Int8WeightOnlyConfig"),
        ("int8dq", "Int8DynamicActivationInt8WeightConfig"),
        ("float8wo", "Float8WeightOnlyConfig"),
        ("int4wo", "Int4WeightOnlyConfig"),
    ],
)
def test_torchao_strings_become_config_objects(qtype: str, cls: str) -> None:
    cfg = get_backend("torchao").diffusers_config(ConfigRequest(qtype, torch.float32))
    assert type(cfg.quant_type).__name__ == cls


def test_modelopt_config_builds_with_pinned_version() -> None:
    cfg = get_backend("modelopt").diffusers_config(ConfigRequest("INT8", torch.bfloat16))
    assert cfg.quant_type == "INT8"


@pytest.mark.parametrize("key", ["bitsandbytes_4bit", "bitsandbytes_8bit", "modelopt"])
def test_gpu_only_backends_refuse_on_cpu(key: str) -> None:
    reason = get_backend(key).unavailable_reason(get_backend(key).default_quant_type, CPU)
    assert reason is not None and "needs an NVIDIA CUDA GPU" in reason
    assert "quanto" in reason  # says what to use instead


@pytest.mark.parametrize("qtype", ["int4wo", "float8dq"])
def test_torchao_cuda_types_refuse_on_cpu(qtype: str) -> None:
    reason = get_backend("torchao").unavailable_reason(qtype, CPU)
    assert reason == f"torchao {qtype} needs a CUDA GPU; use quanto or torchao (both run on CPU)"


def test_float8_needs_capability_8_9() -> None:
    reason = get_backend("torchao").unavailable_reason("float8dq", AMPERE)
    assert reason is not None and "compute capability >= 8.9" in reason and "8.0" in reason
    assert get_backend("torchao").unavailable_reason("float8dq", HOPPER) is None
    assert "8.9" in (get_backend("modelopt").unavailable_reason("FP8", AMPERE) or "")


def test_float8wo_on_cpu_needs_fp32() -> None:
    backend = get_backend("torchao")
    assert backend.unavailable_reason("float8wo", CPU, "float32") is None
    assert "QDS_COMPUTE_DTYPE=float32" in (
        backend.unavailable_reason("float8wo", CPU, "bfloat16") or ""
    )


def test_missing_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("quanto")
    monkeypatch.setattr(type(backend), "module", "optimum.quanto_not_installed")
    reason = backend.unavailable_reason("int8", CPU)
    assert reason == "library optimum-quanto is not installed (pip install optimum-quanto)"


def test_too_new_modelopt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("modelopt")
    monkeypatch.setattr(type(backend), "library_version", lambda self: "0.47.0")
    reason = backend.unavailable_reason("FP8", HOPPER)
    assert (
        reason is not None and "nvidia-modelopt 0.47.0 is newer than diffusers supports" in reason
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize(
    ("backend", "qtype"),
    [
        ("bitsandbytes_4bit", "nf4"),
        ("bitsandbytes_4bit", "fp4"),
        ("bitsandbytes_8bit", "int8"),
        ("modelopt", "FP8"),
        ("modelopt", "INT8"),
        ("torchao", "float8dq"),
        ("torchao", "int4wo"),
    ],
)
def test_loader_refuses_gpu_only_combinations_before_loading(backend: str, qtype: str) -> None:
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        load_pipeline(QuantSettings(quant_backend=backend, quant_type=qtype))


def test_backends_command_lists_every_combination() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    combos = {(r["backend"], r["quant_type"]): r for r in rows}
    assert list(combos) == [
        (b.key, q or "-") for b in BACKENDS.values() for q in (b.quant_types or (None,))
    ]
    assert combos[("quanto", "int4")]["available"] == "yes"
    if not torch.cuda.is_available():
        assert combos[("bitsandbytes_4bit", "nf4")]["available"] == "no"
        assert "CUDA" in combos[("bitsandbytes_4bit", "nf4")]["why_not"]
        assert combos[("torchao", "int8wo")]["available"] == "yes"


def test_modelopt_refuses_on_gpu_with_the_measured_failure() -> None:
    # nvidia-modelopt 0.43 + diffusers 0.42.1 load but cannot run a forward (H200 run 2).
    reason = get_backend("modelopt").unavailable_reason("FP8", HOPPER)
    assert reason is not None and "not FP8QTensor" in reason and "torchao float8dq" in reason


def test_torchao_int4wo_names_its_kernel_package() -> None:
    reason = get_backend("torchao").unavailable_reason("int4wo", HOPPER)
    assert reason == "torchao int4wo needs the mslk kernel package (pip install mslk>=1.0)"
