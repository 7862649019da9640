"""Metrics across the process boundary: the engine records operations, the HTTP process
applies them to its own registry.

The engine's code calls the same API it would call on `service.metrics.Metrics`
(`recorder.cache_hits.inc()`, `recorder.step_duration.labels(m, b, q).observe(s)`,
`record_loaded(recorder, loaded)`); `MetricsRecorder` turns each call into a small tuple,
and the engine sends the tuples with its next message. `apply()` replays them on the HTTP
process's `Metrics`, so /metrics is one ordinary registry.

Why not prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR + MultiProcessCollector):
- a series cannot be removed there (prometheus/client_python#720, #916): an evicted model's
  `qds_model_memory_bytes` would be reported forever;
- every engine restart leaves per-pid files that are summed (or must be marked dead and
  wiped; #236, #566), and `Info` and custom collectors (the GPU gauges) are not supported;
- it needs a writable shared directory set before prometheus_client is imported, which a
  per-app registry (several apps per test process) cannot have.
The cost here is one tuple per operation, sent with messages that go anyway (measured: the
ops of one denoising step pickle to well under a kilobyte).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger("qdserve.telemetry")

# (family attribute on Metrics, label values, method, argument)
Op = tuple[str, tuple[str, ...], str, float | None]

_METHODS = frozenset({"inc", "observe", "set", "remove"})


class _Child:
    def __init__(self, recorder: MetricsRecorder, family: str, labels: tuple[str, ...]) -> None:
        self._recorder = recorder
        self._family = family
        self._labels = labels

    def labels(self, *values: str, **kw: str) -> _Child:
        if kw:
            values = tuple(kw.values())
        return _Child(self._recorder, self._family, tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0) -> None:
        self._recorder._add((self._family, self._labels, "inc", float(amount)))

    def observe(self, value: float) -> None:
        self._recorder._add((self._family, self._labels, "observe", float(value)))

    def set(self, value: float) -> None:
        self._recorder._add((self._family, self._labels, "set", float(value)))

    def remove(self, *values: str) -> None:
        self._recorder._add((self._family, tuple(str(v) for v in values), "remove", None))


class MetricsRecorder:
    """Duck-types the parts of `Metrics` the engine uses; collects operations until drained.

    Thread-safe: the model cache's load thread records too.
    """

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()

    def __getattr__(self, family: str) -> _Child:
        if family.startswith("_"):
            raise AttributeError(family)
        return _Child(self, family, ())

    def _add(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    def loaded(self, loaded: Any) -> None:
        record_loaded(self, loaded)

    def evicted(self, loaded: Any) -> None:
        record_evicted(self, loaded)

    def drain(self) -> list[Op]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


def apply(metrics: Metrics, ops: list[Op]) -> None:
    """Replay the engine's operations on the HTTP process's metrics."""
    for family, labels, method, value in ops:
        target = getattr(metrics, family, None)
        if target is None or method not in _METHODS:
            log.warning("unknown metric operation from the engine: %s.%s", family, method)
            continue
        if method == "remove":
            # Already absent (e.g. a second eviction of a re-loaded variant): nothing to do.
            with contextlib.suppress(KeyError):
                target.remove(*labels)
            continue
        child = target.labels(*labels) if labels else target
        getattr(child, method)(value)


def record_loaded(metrics: Any, loaded: Any) -> None:
    """Record a newly loaded pipeline's memory and load time (on `Metrics` or a recorder)."""
    for name, comp in loaded.components.items():
        metrics.model_memory.labels(
            loaded.model, loaded.backend, loaded.quant_type or "", name
        ).set(comp.storage_bytes)
    metrics.model_load_seconds.labels(loaded.model, loaded.backend).set(loaded.load_seconds)


def record_evicted(metrics: Any, loaded: Any) -> None:
    for name in loaded.components:
        # Already absent (a second eviction of a re-loaded variant): nothing to remove.
        with contextlib.suppress(KeyError):
            metrics.model_memory.remove(loaded.model, loaded.backend, loaded.quant_type or "", name)
