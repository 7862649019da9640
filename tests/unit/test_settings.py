"""Bad settings fail at start-up with a message naming the variable and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantization.planning.units import parse_optional_bytes
from quantization.settings import QuantSettings
from service.settings import ServiceSettings, batch_limit


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        QuantSettings()
    return str(info.value)


def test_defaults_are_the_embedded_model_unquantized() -> None:
    s = QuantSettings()
    assert (s.model, s.quant_backend, s.resolved_quant_type) == ("embedded", "none", None)
    assert s.components_to_quantize == ["denoiser"]


def test_unknown_backend_names_variable_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_QUANT_BACKEND="int3magic")
    assert "QDS_QUANT_BACKEND='int3magic' is not a backend" in msg
    assert "bitsandbytes_4bit" in msg and "modelopt" in msg


def test_wrong_quant_type_for_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_QUANT_BACKEND="quanto", QDS_QUANT_TYPE="nf4")
    assert "QDS_QUANT_TYPE='nf4' is not a quant type of backend 'quanto'" in msg
    assert "int8, int4, int2, float8" in msg


def test_modelopt_type_is_validated_not_silently_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_QUANT_BACKEND="modelopt", QDS_QUANT_TYPE="FP6")
    assert "FP8, INT8, INT4, NF4, NVFP4" in msg


def test_gguf_needs_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_QUANT_BACKEND="gguf")
    assert "QDS_QUANT_BACKEND=gguf needs QDS_GGUF_FILE" in msg


def test_gguf_file_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    msg = _error(monkeypatch, QDS_QUANT_BACKEND="gguf", QDS_GGUF_FILE=str(missing))
    assert f"QDS_GGUF_FILE='{missing}' does not exist" in msg


def test_unknown_component(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_COMPONENTS_TO_QUANTIZE="denoiser,text_encoder_9")
    assert "QDS_COMPONENTS_TO_QUANTIZE has unknown component(s) ['text_encoder_9']" in msg


def test_gguf_cannot_quantize_text_encoders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"")
    msg = _error(
        monkeypatch,
        QDS_QUANT_BACKEND="gguf",
        QDS_GGUF_FILE=str(f),
        QDS_COMPONENTS_TO_QUANTIZE="denoiser,text_encoder_2",
    )
    assert "cannot quantize transformers text encoders" in msg


def test_bad_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_COMPUTE_DTYPE="float7")
    assert "compute_dtype" in msg and "'bfloat16'" in msg


def test_bad_device(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _error(monkeypatch, QDS_DEVICE="tpu")
    assert "QDS_DEVICE='tpu'; allowed: auto, cpu, cuda, cuda:N" in msg


def test_lists_parse_from_comma_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDS_COMPONENTS_TO_QUANTIZE", "denoiser, text_encoder_2")
    monkeypatch.setenv("QDS_MODULES_TO_NOT_CONVERT", "proj_out,norm_out")
    s = QuantSettings()
    assert s.components_to_quantize == ["denoiser", "text_encoder_2"]
    assert s.modules_to_not_convert == ["proj_out", "norm_out"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1234", 1234),
        ("", None),
        ("0", None),
        ("1.5G", 1_500_000_000),
        ("1e9", 10**9),
    ],
)
def test_memory_budget_units(text: str, expected: int | None) -> None:
    assert parse_optional_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GiB", 16 * 2**30), ("1.5e3MB", 1_500_000_000), (" 2 kb ", 2000), ("4096", 4096)],
)
def test_one_size_grammar_for_every_size_setting(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    monkeypatch.setenv("QDS_CACHE_MEMORY_BUDGET", text)
    monkeypatch.setenv("QDS_MAX_BODY_BYTES", text)
    s = ServiceSettings()
    q = QuantSettings(quant_backend="auto", memory_budget=text)
    assert s.cache_memory_budget == s.max_body_bytes == q.memory_budget == expected


def test_zero_size_means_no_cache_budget_but_a_zero_memory_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QDS_CACHE_MEMORY_BUDGET", "0")
    assert ServiceSettings().cache_memory_budget is None
    assert QuantSettings(quant_backend="auto", memory_budget="0").memory_budget == 0


def test_memory_budget_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDS_CACHE_MEMORY_BUDGET", "lots")
    with pytest.raises(ValidationError, match="QDS_CACHE_MEMORY_BUDGET='lots' is not a size"):
        ServiceSettings()


def test_cli_serve_refuses_bad_env_before_binding() -> None:
    env = {"QDS_QUANT_BACKEND": "bitsandbytes_4bit", "QDS_QUANT_TYPE": "int8", "PATH": "/usr/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert "QDS_QUANT_TYPE='int8' is not a quant type of backend 'bitsandbytes_4bit'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_max_batch_auto_resolves_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings().max_batch == "auto"
    # 8 per engine lane on CPU (docs/benchmarks/batch-size.md), 4 on a GPU (one lane there).
    assert batch_limit("auto", "cpu") == 8 and batch_limit("auto", "cpu", 2) == 16
    assert batch_limit("auto", "cuda") == batch_limit("auto", "cuda:1", 1) == 4
    assert batch_limit(5, "cpu", 2) == 5
    monkeypatch.setenv("QDS_MAX_BATCH", "3")
    assert batch_limit(ServiceSettings().max_batch, "cpu") == 3
    monkeypatch.setenv("QDS_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ServiceSettings()


def test_engine_stall_timeout_is_off_or_at_least_two_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ServiceSettings().engine_stall_timeout == 60
    for ok in ("0", "2", "30.5"):
        monkeypatch.setenv("QDS_ENGINE_STALL_TIMEOUT", ok)
        assert ServiceSettings().engine_stall_timeout == float(ok)
    monkeypatch.setenv("QDS_ENGINE_STALL_TIMEOUT", "1")
    with pytest.raises(ValidationError, match=r"use 0 \(off\) or at least 2 seconds"):
        ServiceSettings()


def test_stall_timeout_must_be_shorter_than_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stall limit at or over QDS_REQUEST_TIMEOUT never fires (every request times out
    first): refused with both variables named. Left unset, it follows a short request
    timeout down."""
    defaults = ServiceSettings()
    assert defaults.engine_stall_timeout < defaults.request_timeout
    assert defaults.engine_stall_timeout <= 60  # a hung engine is found in about a minute
    monkeypatch.setenv("QDS_ENGINE_STALL_TIMEOUT", "600")
    with pytest.raises(ValidationError) as info:
        ServiceSettings()
    assert "QDS_ENGINE_STALL_TIMEOUT=600 must be shorter than QDS_REQUEST_TIMEOUT=300" in str(
        info.value
    )
    monkeypatch.delenv("QDS_ENGINE_STALL_TIMEOUT")
    assert ServiceSettings(request_timeout=20).engine_stall_timeout == 10
    assert ServiceSettings(request_timeout=3).engine_stall_timeout == 2
    assert ServiceSettings(request_timeout=1).engine_stall_timeout == 0  # too short to tell


@pytest.mark.parametrize("value", ["", " , ", ",,"])
def test_api_keys_set_but_empty_refuse_to_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """An empty Secret or a stray comma must not turn authentication off silently."""
    monkeypatch.setenv("QDS_API_KEYS", value)
    with pytest.raises(ValidationError) as info:
        ServiceSettings()
    assert "QDS_API_KEYS is set but holds no key" in str(info.value)
    monkeypatch.delenv("QDS_API_KEYS")
    assert ServiceSettings().api_keys == []  # unset: no auth, by choice


def test_serve_refuses_empty_keys_naming_the_variable(tmp_path: Path) -> None:
    env = {"QDS_API_KEYS": " , ", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid QDS_API_KEYS" in proc.stderr and "holds no key" in proc.stderr


def test_per_key_queue_share() -> None:
    assert ServiceSettings(max_queue=32).per_key_limit() == 24
    assert ServiceSettings(max_queue=1).per_key_limit() == 1
    assert ServiceSettings(max_queue=32, max_queue_per_key=4).per_key_limit() == 4
    assert ServiceSettings(max_queue=8, max_queue_per_key=40).per_key_limit() == 8


def test_no_auth_warning_only_off_loopback() -> None:
    from service.auth import no_auth_warning

    assert no_auth_warning("127.0.0.1", False) is None
    assert no_auth_warning("::1", False) is None
    assert no_auth_warning("localhost", False) is None
    assert no_auth_warning("0.0.0.0", True) is None
    warning = no_auth_warning("0.0.0.0", False)
    assert warning is not None and "QDS_API_KEYS" in warning and "0.0.0.0" in warning
