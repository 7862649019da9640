"""Model cache: loaded pipelines keyed by (model, backend, quant type, compute dtype).

- LRU, bounded by an entry count and by a memory budget (the real storage bytes of each
  pipeline, `LoadedPipeline.storage_bytes`).
- An entry is leased while a request holds it (queued or running); leased entries are never
  evicted. Eviction calls `LoadedPipeline.release()`, which really frees the tensors.
- Single flight: concurrent misses on one key share one load (a `concurrent.futures.Future`).
- A failed load is set on that future (every waiter sees it) and is not cached; it is
  remembered for `failure_backoff` seconds (60 by default), during which a request for it gets
  the same failure at once instead of another load attempt; after that a request retries
  (the protected default model is retried at once: readiness waits on it).
- `protected` entries (the engine's default model) are never evicted: an on-demand load of
  another variant makes room among the others, or goes over the limits if it cannot.
- Loads run one at a time (two pipelines loading at once would double the peak memory), each
  on a thread of its own that exits when the load ends, never on the engine's step loop.
  Not a long-lived pool thread: a thread that ran torch ops keeps its OpenMP team alive, and
  with that team alive the step loop on the main thread ran 25-50% slower on 2 cores
  (generate_batch batch 1: 123 ms after a load on the main thread or on an exited thread, 150-185
  ms after one on a live pool thread; batch 4: 270-285 vs 375-395 ms).

The cache lives in the engine process (engine); the HTTP process keeps a mirror of what
is loaded, fed by the engine's events.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# The id format lives in service.variants; re-exported here for the cache's users.
from engine.keys import ModelKey
from quantization.settings import QuantSettings

if TYPE_CHECKING:
    from pipelines.loader import LoadedPipeline
    from service.metrics import Metrics

log = logging.getLogger("qdserve.cache")

# Seconds a failed load is remembered (answered at once) before a request may retry it.
LOAD_FAILURE_BACKOFF_S = 60.0


@dataclass
class Entry:
    key: ModelKey
    loaded: LoadedPipeline
    in_use: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def storage_bytes(self) -> int:
        return self.loaded.storage_bytes


class Lease:
    """Holds an entry in use; `release()` (idempotent) lets it be evicted again."""

    def __init__(self, cache: ModelCache, entry: Entry) -> None:
        self._cache = cache
        self.entry = entry
        self._released = False

    @property
    def loaded(self) -> LoadedPipeline:
        return self.entry.loaded

    @property
    def key(self) -> ModelKey:
        return self.entry.key

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self.entry)


class ModelCache:
    def __init__(
        self,
        loader: Callable[[QuantSettings], LoadedPipeline],
        *,
        max_entries: int,
        memory_budget: int | None,
        metrics: Metrics | None = None,
        on_loaded: Callable[[ModelKey, LoadedPipeline], None] | None = None,
        on_evicted: Callable[[ModelKey, LoadedPipeline], None] | None = None,
        protected: frozenset[ModelKey] = frozenset(),
        failure_backoff: float = LOAD_FAILURE_BACKOFF_S,
    ) -> None:
        # `loader` is an attribute on purpose: tests wrap it to count or fail loads.
        self.loader = loader
        self.max_entries = max_entries
        self.memory_budget = memory_budget
        self.metrics = metrics
        self.on_loaded = on_loaded
        self.on_evicted = on_evicted
        self.protected = protected
        self.failure_backoff = failure_backoff
        # key -> (time.monotonic() of the failure, its exception): the back-off.
        self._failed: dict[ModelKey, tuple[float, BaseException]] = {}
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[ModelKey, Entry] = collections.OrderedDict()
        self._loading: dict[ModelKey, concurrent.futures.Future[Entry]] = {}
        self._serial = threading.Lock()  # one load at a time (see the module docstring)
        self._threads = 0
        self.load_counts: collections.Counter[ModelKey] = collections.Counter()
        self.evictions: list[ModelKey] = []
        self._closed = False

    # -- queries -----------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def loaded_keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._entries)

    def is_loaded(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._entries

    def is_loading(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._loading

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.storage_bytes for e in self._entries.values())

    # -- loading -----------------------------------------------------------------------
    def load(self, key: ModelKey, settings: QuantSettings) -> concurrent.futures.Future[Entry]:
        """Start (or join) the load of `key`; the future resolves to its entry."""
        with self._lock:
            if self._closed:
                raise RuntimeError("model cache is closed")
            entry = self._entries.get(key)
            if entry is not None:
                done: concurrent.futures.Future[Entry] = concurrent.futures.Future()
                done.set_result(entry)
                return done
            failed = self._failed.get(key)
            if failed is not None:
                when, exc = failed
                if time.monotonic() - when < self.failure_backoff:
                    remembered: concurrent.futures.Future[Entry] = concurrent.futures.Future()
                    remembered.set_exception(exc)
                    return remembered
                del self._failed[key]
            fut = self._loading.get(key)
            if fut is None:
                fut = concurrent.futures.Future()
                self._loading[key] = fut
                self._threads += 1
                threading.Thread(
                    target=self._load_serially,
                    args=(key, settings, fut),
                    name=f"qds-load-{self._threads}",
                    daemon=True,
                ).start()
            return fut

    def _load_serially(
        self, key: ModelKey, settings: QuantSettings, fut: concurrent.futures.Future
    ) -> None:
        with self._serial:
            if fut.done():  # answered by close() while waiting for the previous load
                return
            # close() may answer the future while the load runs; the load's own answer then
            # has nobody left to tell.
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self._load(key, settings, fut)

    def _load(self, key: ModelKey, settings: QuantSettings, fut: concurrent.futures.Future) -> None:
        # Make room first: with the entry cap full, evicting before loading keeps the peak at
        # max_entries pipelines instead of max_entries + 1.
        self._evict(reserve=1)
        self.load_counts[key] += 1
        fields = {"model": key.model, "backend": key.backend, "quant_type": key.quant_type}
        log.info("loading model variant %s", key.variant_id, extra=fields)
        _progress_bars()
        start = time.perf_counter()
        try:
            loaded = self.loader(settings)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
                # The protected (default) model is retried on the next request: readiness
                # depends on it, and the operator chose it.
                if self.failure_backoff > 0 and key not in self.protected:
                    self._failed[key] = (time.monotonic(), exc)
            if self.metrics:
                self.metrics.model_loads.labels(key.backend, "failure").inc()
            seconds = time.perf_counter() - start
            log.warning(
                "loading %s failed after %.2fs: %s",
                key.variant_id,
                seconds,
                exc,
                extra={**fields, "load_s": round(seconds, 3)},
            )
            fut.set_exception(exc)
            return
        entry = Entry(key, loaded)
        with self._lock:
            self._loading.pop(key, None)
            closed = self._closed
            if not closed:
                self._entries[key] = entry
        if closed:  # shut down while loading: nobody will use it
            loaded.release()
            fut.set_exception(RuntimeError("the server is shutting down"))
            return
        with self._lock:
            if self.metrics:
                self.metrics.cache_entries.set(len(self._entries))
        if self.metrics:
            self.metrics.model_loads.labels(key.backend, "success").inc()
            self.metrics.loaded(loaded)
        log.info(
            "loaded %s in %.2fs (%d bytes)",
            key.variant_id,
            loaded.load_seconds,
            loaded.storage_bytes,
            extra={
                **fields,
                "load_s": round(loaded.load_seconds, 3),
                "storage_bytes": loaded.storage_bytes,
            },
        )
        if self.on_loaded:
            self.on_loaded(key, loaded)
        self._evict(protect=key)
        fut.set_result(entry)

    def lease(self, key: ModelKey) -> Lease | None:
        """Lease the entry for `key` if it is loaded (counted as a hit), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.in_use += 1
            self._entries.move_to_end(key)
        if self.metrics:
            self.metrics.cache_hits.inc()
        return Lease(self, entry)

    # -- eviction ----------------------------------------------------------------------
    def _release(self, entry: Entry) -> None:
        with self._lock:
            entry.in_use -= 1
        # An entry that was leased when limits were exceeded may be evictable now.
        self._evict()

    def _evict(self, reserve: int = 0, protect: ModelKey | None = None) -> None:
        victims: list[Entry] = []
        with self._lock:
            while True:
                over_count = len(self._entries) + reserve > self.max_entries
                over_bytes = (
                    self.memory_budget is not None
                    and sum(e.storage_bytes for e in self._entries.values()) > self.memory_budget
                )
                if not (over_count or over_bytes):
                    break
                # Least recently used first; never an entry in use, never the one just loaded,
                # never the most recently used one after a load (a budget smaller than one
                # pipeline must still leave one to serve with); making room before a load
                # may take it.
                newest = next(reversed(self._entries), None)
                victim = next(
                    (
                        e
                        for k, e in self._entries.items()
                        if e.in_use == 0
                        and k != protect
                        and k not in self.protected
                        and (reserve or k != newest)
                    ),
                    None,
                )
                if victim is None:
                    if over_bytes or over_count:
                        log.debug("cache over its limits but every entry is in use")
                    break
                del self._entries[victim.key]
                victims.append(victim)
            if self.metrics:
                self.metrics.cache_entries.set(len(self._entries))
        for victim in victims:
            log.info("evicting %s (%d bytes)", victim.key.variant_id, victim.storage_bytes)
            self.evictions.append(victim.key)
            if self.metrics:
                self.metrics.cache_evictions.inc()
                self.metrics.evicted(victim.loaded)
            if self.on_evicted:
                self.on_evicted(victim.key, victim.loaded)
            victim.loaded.release()
        if victims:
            _trim_heap()

    def close(self) -> None:
        """Drop every entry (shutdown); a load in progress finishes and is then dropped."""
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            pending = [f for f in self._loading.values() if not f.done()]
        for fut in pending:
            # Loads still waiting for their turn would otherwise never answer their waiters.
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                fut.set_exception(RuntimeError("the server is shutting down"))
        for entry in entries:
            entry.loaded.release()
        _trim_heap()


def _progress_bars() -> None:
    """diffusers' / transformers' load progress bars in a terminal only: in a log file or a
    container log they would be noise between the JSON lines."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    on = sys.stderr.isatty()
    for lib in (diffusers_logging, transformers_logging):
        (lib.enable_progress_bar if on else lib.disable_progress_bar)()


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS drops
    after an eviction instead of only becoming reusable inside this process."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass
