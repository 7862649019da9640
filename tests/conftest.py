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
    from quantization.embedded import random_model_path

    return random_model_path(cache_dir)
