"""QDS_COMPILE_BACKGROUND=true: /readyz turns 200 once the model is loaded, requests
are served eager while a background thread compiles, then on the compiled graphs; no request
meets a compile, whatever its size (engine/startup.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import running_server

from engine.startup import BackgroundCompiler, compiler_of
from pipelines import step_cache

IMG = "/v1/images/generations"
pytestmark = pytest.mark.timeout(900)


def _until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _metric(client: httpx.Client, line_start: str) -> float | None:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_ready_while_compiling_and_no_request_meets_a_compile(cache_dir: Path) -> None:
    with (
        running_server(
            cache_dir,
            compile=True,
            compile_background=True,
            warmup_sizes=["32x32"],
            step_cache="fbcache:0.2",  # the default: the split forward's parts compile too
        ) as server,
        server.client(timeout=600) as c,
    ):
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["mode"] in ("compiling", "compiled")
        loaded = server.qds.core_cache.entries()[0].loaded
        compiler = compiler_of(loaded)
        assert compiler is not None and loaded.pipeline.transformer._compiled_call_impl is compiler
        compiles_before = BackgroundCompiler.serving_compiles

        # Served while the graphs build (eager where no graph exists yet), a warmed size and
        # sizes / batch sizes the warm-up did not cover.
        for body in (
            {"prompt": "a red circle", "size": "32x32"},
            {"prompt": "a red circle", "size": "32x32", "step_cache": "off"},
            {"prompt": "a red circle", "size": "32x32", "n": 3},
            {"prompt": "a blue square", "size": "48x48"},
        ):
            r = c.post(IMG, json=body)
            assert r.status_code == 200, r.text

        _until(lambda: c.get("/readyz").json()["mode"] == "compiled", 600, "mode compiled")
        assert _metric(c, 'qds_serving_mode{mode="compiled"}') == 1.0
        assert _metric(c, 'qds_serving_mode{mode="compiling"}') == 0.0

        # The warm-up's shape now runs a compiled graph.
        before = dict(compiler.forwards)
        r = c.post(IMG, json={"prompt": "a green triangle", "size": "32x32"})
        assert r.status_code == 200
        assert compiler.forwards["compiled"] > before["compiled"]
        assert compiler.forwards["eager"] == before["eager"]

        # 48x48 was met while serving: compiled in the background too, then used.
        _until(lambda: compiler.join(0.1), 600, "the 48x48 compile")
        before = dict(compiler.forwards)
        r = c.post(IMG, json={"prompt": "a blue square", "size": "48x48"})
        assert r.status_code == 200
        assert compiler.forwards["compiled"] > before["compiled"]

        # The compile thread leaves once its queue is empty (engine.startup._spawn: while a
        # thread that ran compiled graphs lives, its OpenMP team cuts the serving workers'
        # spin-wait and a lone request served 0.71x the img/s); a new miss starts another.
        _until(lambda: compiler._thread is None, 30, "the compile thread to leave")
        assert not any(t.name == "qds-compile" and t.is_alive() for t in threading.enumerate())
        # The step cache's parts (head, tail, output) compiled on the background thread too;
        # the whole denoiser's graph was not part of "compiled" (requests run the parts), but
        # the request that opted out of the cache had it compiled afterwards.
        labels = [label for label, _ in compiler.stats()["compile_seconds"]]
        assert any(label.startswith("head ") for label in labels), labels
        assert any(label.startswith("tail ") for label in labels), labels
        assert all(signature[0] != "model" for signature in compiler._required)
        assert any(label[0].isdigit() for label in labels), labels
        assert step_cache.parts_compiled(loaded.pipeline.transformer)
        # Nothing compiled on a serving thread (the engine loop or a lane): every compile ran
        # on the background thread.
        assert BackgroundCompiler.serving_compiles == compiles_before
        stats = compiler.stats()
        assert stats["error"] is None and stats["compiled"] >= 2, stats
        _until(
            lambda: (_metric(c, 'qds_denoiser_forwards_total{path="compiled"}') or 0) > 0,
            10,
            "the forwards counter",
        )
