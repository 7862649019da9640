"""The README documents every setting, and its commands exist."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def _readme_operator_commands() -> dict[str, str]:
    """`qdserve <command> <args...>` lines of the README's operator-tools block, by command."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Operator tools", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return {line.split()[1]: line for line in lines if line.startswith("qdserve ")}


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    # A child process: `bench` and `train-demo` run their checkout module as a program.
    code = f"from service.cli import main; raise SystemExit(main([{command!r}, '--help']))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, (command, proc.stderr[-2000:])
    return proc.stdout


def test_readme_documents_exactly_the_cli_subcommands() -> None:
    from service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(_readme_operator_commands()) == set(sub.choices)


def test_each_readme_command_has_its_own_usage_and_documented_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`qdserve X --help` prints X's own usage line, and every option and choice the README
    shows for X is one X accepts (`qdserve --help` alone lists every name, so it proves
    nothing)."""
    for command, line in _readme_operator_commands().items():
        usage = _help(command, capsys)
        assert usage.startswith(f"usage: qdserve {command} "), usage[:200]
        for option in re.findall(r"--[a-z][a-z-]*", line):
            assert option in usage, f"README shows {option} for qdserve {command}"
        for choices in re.findall(r"\b[A-Za-z0-9_-]+(?:\|[A-Za-z0-9_-]+)+", line):
            for choice in choices.split("|"):
                assert choice in usage, f"README shows {choice} for qdserve {command}"
