"""The README documents every setting, and its commands exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_settings_table_matches_the_code() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from doc_blocks import read_block
    from settings_table import BLOCK, render

    assert read_block(ROOT / "README.md", BLOCK) == render(), (
        "run: python tools/settings_table.py --write"
    )


def test_two_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    for target in ("serve", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_subcommands_listed_in_readme_exist() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    for command in ("serve", "backends", "quantize", "convert-gguf", "bench", "train-demo"):
        assert command in proc.stdout
        assert f"qdserve {command}" in (ROOT / "README.md").read_text()
