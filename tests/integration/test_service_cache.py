"""Model cache through a real server: backends side by side, single flight, failed loads,
LRU eviction under the entry cap and the memory budget, in-use entries never evicted.

The cache lives in the engine core; these servers run it inline (`qds.core_cache`), and
`qds.cache` is the HTTP process's mirror of it (what /v1/models shows)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_service_support import Server, running_server

from engine.keys import key_for
from quantization.backends import ModelLoadError

IMG = "/v1/images/generations"
pytestmark = pytest.mark.timeout(180)


def _post(server: Server, body: dict) -> httpx.Response:
    with server.client() as c:
        return c.post(IMG, json={"size": "32x32", **body})


def _key(server: Server, backend: str, qtype: str | None = None):
    return key_for(server.qds.quant.with_backend(backend, qtype))


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir, allow_on_demand_load=True, cache_max_entries=5, preload=["quanto:int8"]
    ) as s:
        yield s


def test_two_backends_side_by_side_each_serves_its_requests(server: Server) -> None:
    scheduler = server.qds.scheduler
    none_key, quanto_key = server.qds.default_key, _key(server, "quanto", "int8")
    assert {none_key, quanto_key} <= set(server.qds.cache.loaded_keys())
    for backend, key in (("none", none_key), ("quanto", quanto_key), ("none", none_key)):
        r = _post(server, {"prompt": "a", "seed": 3, "quant_backend": backend})
        assert r.status_code == 200 and r.json()["backend"] == backend
        # The last denoising step ran on that backend's cache entry.
        assert scheduler.step_log[-1][0][0] == key
    # Selecting by model id, as listed by /v1/models.
    with server.client() as c:
        ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert ids["qdserve/embedded-flux:quanto:int8"]["loaded"]
    r = _post(server, {"prompt": "a", "model": "qdserve/embedded-flux:quanto:int8"})
    assert r.json()["backend"] == "quanto" and r.json()["quant_type"] == "int8"


def test_single_flight_under_concurrent_misses(server: Server) -> None:
    cache = server.qds.core_cache
    key = _key(server, "torchao", "int8wo")
    real = cache.loader

    def slow_loader(settings):
        time.sleep(0.5)  # widen the window in which the other requests arrive
        return real(settings)

    cache.loader = slow_loader
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(
                pool.map(
                    lambda i: _post(server, {"prompt": f"p{i}", "quant_backend": "torchao"}),
                    range(6),
                )
            )
    finally:
        cache.loader = real
    assert [r.status_code for r in results] == [200] * 6
    assert {r.json()["quant_type"] for r in results} == {"int8wo"}
    assert cache.load_counts[key] == 1


def test_failed_load_reported_to_all_waiters_then_retry_succeeds(server: Server) -> None:
    cache = server.qds.core_cache
    key = _key(server, "torchao", "int8dq")
    real = cache.loader
    calls: list[int] = []

    def failing_once(settings):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
            raise ModelLoadError("injected: weights file truncated")
        return real(settings)

    cache.loader = failing_once
    try:
        body = {"prompt": "x", "quant_backend": "torchao", "quant_type": "int8dq"}
        with ThreadPoolExecutor(3) as pool:
            failed = list(pool.map(lambda _: _post(server, body), range(3)))
        for r in failed:
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "model_load_failed" and "server log" in err["message"]
            assert "truncated" not in err["message"]  # the cause is the operator's
        assert not cache.is_loaded(key)  # not cached
        assert server.qds.cache.is_loaded(server.qds.default_key)  # the default never evicted
        # Remembered for the back-off: answered at once, no second load attempt.
        again = _post(server, body)
        assert again.status_code == 503 and again.json()["error"]["code"] == "model_load_failed"
        assert cache.load_counts[key] == 1
        cache._failed.clear()  # the back-off has passed
        retry = _post(server, body)
    finally:
        cache.loader = real
    assert retry.status_code == 200 and retry.json()["quant_type"] == "int8dq"
    assert cache.load_counts[key] == 2  # one shared failed load, one retry


def test_backend_unavailable_here_is_400(server: Server) -> None:
    r = _post(server, {"prompt": "x", "quant_backend": "bitsandbytes_4bit"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("quant_backend", "backend_unavailable")
    # The service still serves.
    assert _post(server, {"prompt": "x"}).status_code == 200


# -- eviction ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, allow_on_demand_load=True, cache_max_entries=2) as s:
        yield s


def _entry(server: Server, key):
    return next(e for e in server.qds.core_cache.entries() if e.key == key)


def test_lru_eviction_under_entry_cap_frees_memory(small: Server) -> None:
    cache = small.qds.core_cache
    none_key = small.qds.default_key
    quanto_key = _key(small, "quanto", "int8")
    torchao_key = _key(small, "torchao", "int8wo")
    assert _post(small, {"prompt": "a", "quant_backend": "quanto"}).status_code == 200
    assert cache.loaded_keys() == [none_key, quanto_key]
    assert _post(small, {"prompt": "a"}).status_code == 200  # none is now most recent
    loaded = _entry(small, quanto_key).loaded
    transformer = weakref.ref(loaded.pipeline.transformer)
    del loaded
    assert _post(small, {"prompt": "a", "quant_backend": "torchao"}).status_code == 200
    assert cache.loaded_keys() == [none_key, torchao_key]
    assert cache.evictions[-1] == quanto_key
    gc.collect()
    assert transformer() is None  # the evicted pipeline's weights are really gone
    with small.client() as c:
        cards = {m["id"]: m["loaded"] for m in c.get("/v1/models").json()["data"]}
    assert cards == {"qdserve/embedded-flux": True, "qdserve/embedded-flux:torchao:int8wo": True}
    assert "qds_cache_evictions_total 1.0" in small.client().get("/metrics").text


def test_lru_eviction_under_memory_budget(small: Server) -> None:
    cache = small.qds.core_cache
    none_key = small.qds.default_key
    torchao_key = _key(small, "torchao", "int8wo")
    quanto_key = _key(small, "quanto", "int8")
    assert set(cache.loaded_keys()) == {none_key, torchao_key}
    sizes = {e.key: e.storage_bytes for e in cache.entries()}
    # Room for both loaded pipelines but not for a third; the entry cap no longer binds.
    cache.max_entries = 10
    cache.memory_budget = sizes[none_key] + sizes[torchao_key] + 1
    try:
        assert _post(small, {"prompt": "a", "quant_backend": "torchao"}).status_code == 200
        assert _post(small, {"prompt": "a", "quant_backend": "quanto"}).status_code == 200
        # none was least recently used, but it is the default model: never evicted for an
        # on-demand load. torchao, the least recently used of the others, made room.
        assert cache.loaded_keys() == [none_key, quanto_key]
        assert cache.total_bytes() <= cache.memory_budget
        assert cache.evictions[-1] == torchao_key
    finally:
        cache.max_entries = 2
        cache.memory_budget = None


def test_entry_in_use_is_never_evicted(small: Server) -> None:
    cache = small.qds.core_cache
    scheduler = small.qds.scheduler
    quanto_key = _key(small, "quanto", "int8")
    gate = threading.Event()
    arrived = threading.Event()

    def hold(_batch) -> None:
        # Hold the step, but keep reading the engine's pipe (as a whole pipeline call does
        # between its steps): the loads below are started from messages.
        arrived.set()
        deadline = time.monotonic() + 30
        while not gate.wait(0.01) and time.monotonic() < deadline:
            scheduler.between_steps()

    assert _post(small, {"prompt": "a", "quant_backend": "quanto"}).status_code == 200
    scheduler.before_batch = hold
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_post, small, {"prompt": "held", "quant_backend": "quanto"})
            assert arrived.wait(20)
            scheduler.before_batch = None
            # Loading two other variants with a cap of 2 evicts everything that is idle...
            for backend in ("none", "torchao"):
                # (These wait behind the held request in the queue; only the loads matter.)
                pool2 = ThreadPoolExecutor(1)
                pool2.submit(_post, small, {"prompt": "b", "quant_backend": backend})
                deadline = time.monotonic() + 30
                while not any(k.backend == backend for k in cache.loaded_keys()):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                # ...but never the entry serving the held request.
                assert quanto_key in cache.loaded_keys()
                pool2.shutdown(wait=False)
            gate.set()
            assert held.result(30).status_code == 200
    finally:
        scheduler.before_batch = None
        gate.set()


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_eviction_returns_memory_to_the_os(cache_dir: Path) -> None:
    """RSS after an eviction is back near its level before the evicted pipeline loaded."""
    import statistics

    from engine.cache import ModelCache
    from pipelines.embedded import random_model_path
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    # The evicted variant is quantized at load (fresh anonymous memory; an unquantized load
    # maps the safetensors file instead, which RSS barely shows), on the larger random-weight
    # build; medians over three cycles keep allocator noise out.
    model = str(random_model_path(cache_dir))
    base = QuantSettings(cache_dir=cache_dir, model=model)
    variant = base.with_backend("torchao", "int8wo")
    cache = ModelCache(load_pipeline, max_entries=2, memory_budget=None)

    async def use(settings) -> None:
        # What the engine does: load (single flight), then lease the entry for a batch.
        key = key_for(settings)
        await asyncio.wrap_future(cache.load(key, settings))
        lease = cache.lease(key)
        assert lease is not None
        lease.release()

    def evict_variant() -> None:
        asyncio.run(use(base))  # base most recent: the variant is the LRU entry
        cache.max_entries = 1
        cache._evict()
        cache.max_entries = 2
        gc.collect()
        assert cache.loaded_keys() == [key_for(base)]

    try:
        asyncio.run(use(base))
        # One load / evict cycle first: library imports and allocator pools stay resident.
        asyncio.run(use(variant))
        evict_variant()
        growth, residual, storage = [], [], 0
        for _ in range(3):
            before = _rss()
            asyncio.run(use(variant))
            loaded = _rss()
            storage = next(e.storage_bytes for e in cache.entries() if e.key == key_for(variant))
            evict_variant()
            growth.append(loaded - before)
            residual.append(_rss() - before)
        # Loading costs at least half its storage; evicting gives back at least 75% of what
        # the load took (medians over three cycles).
        assert statistics.median(growth) > 0.5 * storage, (growth, residual, storage)
        assert statistics.median(residual) < 0.25 * statistics.median(growth), (
            growth,
            residual,
            storage,
        )
    finally:
        cache.close()
