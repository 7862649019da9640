"""engine.startup without a model: where the compile caches go."""

from __future__ import annotations

import os
import threading
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


def test_shared_threads_compile_one_graph_for_two_thread_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QDS_COMPILE_SHARED_THREADS: a function compiled on 2 threads, then run on 1 thread
    (a lane), is an FX cache hit with it and a second compile (a miss) without it, also on a
    thread started after the setting (the first version set it for the calling thread only:
    the server's compile thread still compiled per thread count)."""
    import torch
    from torch._dynamo.utils import counters

    from engine.startup import configure_kernel_threads

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    before = torch.get_num_threads()

    def misses_at_two_then_one(shared: bool) -> tuple[int, int]:
        configure_kernel_threads(shared)
        torch._dynamo.reset()
        counters.clear()

        def f(x: torch.Tensor) -> torch.Tensor:  # a new code object each time: no reuse
            return torch.nn.functional.gelu(x @ x.T + 1.0).sum(dim=1)

        compiled = torch.compile(f)
        x = torch.randn(64, 64)

        def on_a_new_thread() -> None:
            # As the background compile thread and the lanes do: a thread started after the
            # setting (torch keeps plain config writes per thread).
            for threads in (2, 1):
                torch.set_num_threads(threads)
                compiled(x)

        worker = threading.Thread(target=on_a_new_thread)
        try:
            worker.start()
            worker.join()
        finally:
            torch.set_num_threads(before)
        inductor = counters["inductor"]
        return int(inductor["fxgraph_cache_miss"]), int(inductor["fxgraph_cache_hit"])

    try:
        assert misses_at_two_then_one(False) == (2, 0)
        assert misses_at_two_then_one(True) == (1, 1)
    finally:
        import torch._inductor.config as inductor

        from engine.compiling import process_default

        process_default(inductor, "cpp.dynamic_threads", False)
        torch._dynamo.reset()
