"""The registry lists backends explicitly (auto.py), survives a broken one, and each backend
owns its decisions (no key tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.prequantize import NotSerializable, quantize_and_save
from quantization.backends import BACKENDS, get_backend
from quantization.backends.auto import AUTO_BACKEND_MAPPING, load_backends
from quantization.backends.base import QuantBackend
from quantization.settings import QuantSettings

ROOT = Path(__file__).resolve().parents[2]


def test_a_new_backend_is_its_module_and_one_line_in_auto(tmp_path: Path) -> None:
    # A copy of the package with one module added and one line in auto.py's mapping: the
    # settings, the CLI's table and the registry pick it up; existing keys keep their places.
    import shutil

    shutil.copytree(ROOT / "quantization", tmp_path / "quantization")
    backends = tmp_path / "quantization" / "backends"
    (backends / "fakeq.py").write_text(
        textwrap.dedent(
            """
            from quantization.backends.base import QuantBackend

            class FakeQ(QuantBackend):
                key = "fakeq"
                quant_types = ("q3",)
                default_quant_type = "q3"
            """
        )
    )
    auto = backends / "auto.py"
    auto.write_text(
        auto.read_text().replace(
            '"sdnq": "quantization.backends.sdnq:SDNQBackend",\n',
            '"sdnq": "quantization.backends.sdnq:SDNQBackend",\n'
            '    "fakeq": "quantization.backends.fakeq:FakeQ",\n',
        )
    )
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import quantization.backends as package
        assert package.__file__.startswith({str(tmp_path)!r})
        from quantization.settings import QuantSettings
        from service.cli import backend_table
        settings = QuantSettings(quant_backend="fakeq")
        rows = [r["backend"] for r in backend_table()]
        print(json.dumps([list(package.BACKENDS), settings.resolved_quant_type, rows]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys, qtype, rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [k for k in keys if k != "fakeq"] == list(BACKENDS)
    assert keys.index("fakeq") > keys.index("modelopt")
    assert qtype == "q3" and "fakeq" in rows


def test_a_backend_that_fails_to_import_does_not_break_the_registry(tmp_path: Path) -> None:
    (tmp_path / "brokenq.py").write_text("raise ImportError('libbroken.so: cannot open')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        backends, broken = load_backends({**AUTO_BACKEND_MAPPING, "brokenq": "brokenq:BrokenQ"})
    finally:
        sys.path.remove(str(tmp_path))
    assert list(backends) == list(BACKENDS)
    assert broken == {"brokenq": "ImportError: libbroken.so: cannot open"}


def test_the_mapping_lists_each_class_under_its_own_key() -> None:
    wrong = {"quanto": AUTO_BACKEND_MAPPING["none"]}
    with pytest.raises(TypeError, match="defines key 'none', listed as 'quanto'"):
        load_backends(wrong)
    assert all(isinstance(b, QuantBackend) for b in BACKENDS.values())


def test_prequantize_decisions_belong_to_the_backend() -> None:
    assert not get_backend("none").can_prequantize(None)
    assert not get_backend("gguf").can_prequantize("Q8_0")
    assert "convert-gguf" in get_backend("gguf").prequantize_refusal("Q8_0")
    assert get_backend("quanto").can_prequantize("int8")
    assert get_backend("sdnq").can_prequantize("uint4")
    assert not get_backend("torchao").safe_serialization("int8wo")
    assert get_backend("sdnq").safe_serialization("int8")


def test_gguf_cannot_be_pre_quantized(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"")
    with pytest.raises(NotSerializable, match=r"the \.gguf file is the pre-quantized form"):
        quantize_and_save(QuantSettings(quant_backend="gguf", gguf_file=f), tmp_path / "out")


def test_another_backends_option_is_refused() -> None:
    with pytest.raises(ValidationError, match="QDS_GGUF_FILE is set but QDS_QUANT_BACKEND='sdnq'"):
        QuantSettings(quant_backend="sdnq", gguf_file="x.gguf")


def test_with_backend_drops_options_of_other_backends(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"")
    served = QuantSettings(gguf_file=f)  # none may carry it for per-request gguf variants
    assert served.with_backend("gguf", "Q8_0").gguf_file == f
    assert served.with_backend("sdnq", "int8").gguf_file is None


def test_default_prepare_returns_the_settings(tmp_path: Path) -> None:
    settings = QuantSettings(quant_backend="sdnq", quant_type="uint4")
    assert get_backend("sdnq").prepare(settings, tmp_path, "unused") is settings
    assert not list(tmp_path.iterdir())


def test_gguf_needs_its_file_unless_unprepared(tmp_path: Path) -> None:
    # The conversion itself runs in tests/backends/test_loading.py (every GGUF type loads
    # through it).
    with pytest.raises(ValidationError, match="QDS_QUANT_BACKEND=gguf needs QDS_GGUF_FILE"):
        QuantSettings(quant_backend="gguf", quant_type="Q4_0")
    unprepared = QuantSettings.unprepared(quant_backend="gguf", quant_type="Q4_0")
    assert unprepared.gguf_file is None and unprepared.resolved_quant_type == "Q4_0"
    f = tmp_path / "given.gguf"
    f.write_bytes(b"")
    given = QuantSettings(quant_backend="gguf", quant_type="Q4_0", gguf_file=f)
    assert get_backend("gguf").prepare(given, tmp_path / "work", "unused") is given  # used as it is


def test_unprepared_settings_are_still_validated() -> None:
    with pytest.raises(ValidationError, match="QDS_QUANT_TYPE='Q4_K' is not a quant type"):
        QuantSettings.unprepared(quant_backend="gguf", quant_type="Q4_K")
