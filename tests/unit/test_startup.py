"""engine.startup without a model: where the compile caches go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.startup import configure_compile_cache


def test_compile_cache_goes_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "x")  # so that delenv restores it after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere/triton")
    chosen = configure_compile_cache(tmp_path)
    assert chosen == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere/triton"  # the operator's choice stays
    assert configure_compile_cache(None) == {}


def test_torch_default_is_not_an_operator_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch writes /tmp/torchinductor_<user> into the environment the first time anything
    asks for its cache; the volume still wins over that."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("TRITON_CACHE_DIR", "/operator/triton")
    assert configure_compile_cache(tmp_path) == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")
    }
