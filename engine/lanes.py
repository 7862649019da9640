"""Lanes: step batches of one model denoised at the same time, each on its own thread.

On a CPU a transformer forward at the demo model's sizes leaves cores idle between its many
small kernels even with every intra-op thread on it: two half batches stepped at once, each on
a thread of its own with half the intra-op threads, serve more images per second than one
batch on all of them (`qdserve bench batch-size`, the `StepBatch x2 lanes` column; splitting
one forward in two inside a step gained nothing when tried). So the scheduler may run up to
`lanes` step batches at once; a batch running alone stays on the engine's main thread with
all its threads (a lone request's latency is unchanged).

Hand-written: torch's inter-op pool (`torch.jit.fork`) runs TorchScript only, and a plain
ThreadPoolExecutor cannot give each worker its own OpenMP thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

# What one lane's step gave: (finished requests, out-of-memory message, error text).
LaneResult = tuple[list[Any], str | None, str | None]


def classify(exc: BaseException) -> tuple[str | None, str | None]:
    """(oom message, None) for an out-of-memory error, (None, error text) otherwise.

    Only strings leave: keeping `exc` would keep its traceback, and so the failed call's
    tensors, alive past the handler.
    """
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        text = str(exc)
        return (text.splitlines()[0] if text else "out of memory"), None
    return None, f"{type(exc).__name__}: {exc}"


class Lanes:
    """`count` threads, each pinned to `threads` torch intra-op threads."""

    _pools: ClassVar[dict[tuple[int, int], Lanes]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, count: int, threads: int) -> None:
        import torch

        # torch.set_num_threads sets the calling thread's OpenMP count and the count new
        # threads adopt at their first torch call: each worker makes that first call, pins
        # itself, and the caller's count is put back as the default for everyone else.
        caller = torch.get_num_threads()
        ready = threading.Barrier(count + 1)

        def pin() -> None:
            torch.get_num_threads()
            torch.set_num_threads(threads)
            ready.wait()

        self._pool = ThreadPoolExecutor(count, thread_name_prefix="qds-lane", initializer=pin)
        for _ in range(count):
            self._pool.submit(lambda: None)
        ready.wait()
        torch.set_num_threads(caller)

    @classmethod
    def get(cls, count: int) -> Lanes:
        """The shared lanes for `count` batches at once, the engine's threads split evenly."""
        import torch

        threads = max(1, torch.get_num_threads() // count)
        with cls._guard:
            if (count, threads) not in cls._pools:
                cls._pools[(count, threads)] = cls(count, threads)
            return cls._pools[(count, threads)]

    def run(
        self,
        steps: Sequence[Callable[[], Any]],
        classify: Callable[[Exception], tuple[str | None, str | None]] = classify,
    ) -> list[LaneResult]:
        """Run each step on a lane; errors come back as text (`classify`), never raised, so
        no failed call's frames (and tensors) outlive the lane."""

        def one(step: Callable[[], list[Any]]) -> LaneResult:
            try:
                return step(), None, None
            except Exception as exc:
                oom, error = classify(exc)
                return [], oom, error

        return list(self._pool.map(one, steps))

    def run_or_raise(self, steps: Sequence[Callable[[], Any]]) -> None:
        """`run`, then a RuntimeError with the first failure's text (warm-ups, benchmarks)."""
        for _, oom, error in self.run(steps):
            if oom or error:
                raise RuntimeError(oom or error)
