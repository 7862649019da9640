"""engine.startup without a model: where the compile caches go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.startup import configure_compile_cache


def test_compile_cache_goes_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # unset (restored after the test)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere/triton")
    chosen = configure_compile_cache(tmp_path)
    assert chosen == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere/triton"  # the operator's choice stays
    assert configure_compile_cache(None) == {}
