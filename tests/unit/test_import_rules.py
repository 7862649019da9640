"""The import rules (pyproject.toml's [tool.importlinter]) hold: runtime packages import only
the layers below them, nothing in them imports in a circle (function-level imports included),
and nothing in the runtime imports examples/ or benchmarks/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_the_runtime_keeps_the_import_rules() -> None:
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_the_rules_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The check can fail: a copy of the tree with one upward import (pipelines -> engine)
    and one function-level cycle (quantization.storage <-> quantization.environment)."""
    import shutil

    for name in ("quantization", "pipelines", "engine", "service", "examples", "benchmarks"):
        shutil.copytree(
            ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "pipelines" / "previews.py", "a") as f:
        f.write("\n\ndef _upward() -> None:\n    import engine.scheduler  # noqa: F401\n")
    with open(tmp_path / "quantization" / "storage.py", "a") as f:
        f.write("\n\ndef _a() -> None:\n    import quantization.environment  # noqa: F401\n")
    with open(tmp_path / "quantization" / "environment.py", "a") as f:
        f.write("\n\ndef _b() -> None:\n    import quantization.storage  # noqa: F401\n")
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(exe), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode != 0
    assert "pipelines.previews -> engine.scheduler" in proc.stdout
    assert "No cycles are allowed in quantization" in proc.stdout
