"""Shared fixtures: an isolated model cache per test session, and GPU skipping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Built models are cached under the session's own folder unless the runner sets one, so a
# test never depends on what an earlier run left in ~/.cache.
os.environ.setdefault(
    "QDS_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "test-models")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir() -> Iterator[Path]:
    path = Path(os.environ["QDS_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    yield path


@pytest.fixture(scope="session")
def embedded_path(cache_dir: Path) -> Path:
    from pipelines.embedded import random_model_path

    return random_model_path(cache_dir)


# A skip whose reason says a tool is missing is not a pass: list them at the end, loudly, so a
# fresh clone's `make test` says what it could not run and how to get it (`.ci/run` installs
# the tools first); QDS_REQUIRE_TOOLS=1 turns such skips into a failing run.
_TOOL_SKIP_MARKERS = ("is not installed", "needs Debian's", "too old")
_missing_tools: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[-1]).removeprefix("Skipped: ")
        if any(marker in reason for marker in _TOOL_SKIP_MARKERS):
            _missing_tools[reason] = _missing_tools.get(reason, 0) + 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _missing_tools and os.environ.get("QDS_REQUIRE_TOOLS") == "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _missing_tools:
        return
    total = sum(_missing_tools.values())
    terminalreporter.section(f"{total} test(s) NOT RUN: a tool they drive is missing", sep="!")
    for reason, count in sorted(_missing_tools.items()):
        terminalreporter.write_line(f"  {count:3d}  {reason}")
    terminalreporter.write_line("  `.ci/run` installs them (see its apt step).")
    if os.environ.get("QDS_REQUIRE_TOOLS") == "1":
        terminalreporter.write_line("  QDS_REQUIRE_TOOLS=1: this run fails.")
