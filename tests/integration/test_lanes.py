"""Engine lanes (QDS_ENGINE_LANES): step batches of one model denoised at the same time.

Real StepBatches on the embedded model, driven by a real EngineCore through its pipe (the
harness of test_engine_core.py): lanes open before batches grow, run concurrently, keep the
same-seed guarantee, and a lane's failure stays in its batch.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_engine_core import Gate, Harness

from engine import messages as m
from engine.core import EngineHooks
from engine.failures import EngineError
from engine.lanes import Lanes
from pipelines.generate import GenerationRequest, generate
from pipelines.loader import load_pipeline
from quantization.settings import QuantSettings
from service.settings import ServiceSettings, lane_count

TOL = 2  # uint8 pixels: the step loop's stated same-seed tolerance (README)


def test_lane_count_auto_is_two_on_a_multi_thread_cpu_and_one_on_a_gpu() -> None:
    assert lane_count("auto", "cpu", 2) == 2
    assert lane_count("auto", "cpu", 16) == 2
    assert lane_count("auto", "cpu", 1) == 1  # one thread: nothing to share out
    assert lane_count("auto", "cuda", 16) == 1
    assert lane_count(3, "cuda:0", 1) == 3
    assert ServiceSettings(engine_lanes="1").engine_lanes == 1
    with pytest.raises(ValidationError, match="engine_lanes"):
        ServiceSettings(engine_lanes="0")


def test_lane_threads_run_on_their_own_torch_thread_count() -> None:
    import torch

    before = torch.get_num_threads()
    lanes = Lanes(2, 1)
    names: list[str] = []

    def probe() -> list[int]:
        names.append(threading.current_thread().name)
        return [torch.get_num_threads()]

    results = lanes.run([probe, probe], lambda exc: (None, str(exc)))
    assert [r[0] for r in results] == [[1], [1]]
    assert all(n.startswith("qds-lane") for n in names)
    assert torch.get_num_threads() == before  # the caller's count is untouched


def _refuse(jobs: list) -> None:
    if any(j.request.prompt == "boom" for j in jobs):
        raise RuntimeError("refused by the test hook")


class _GateAndRefuse(Gate):
    def __call__(self, jobs: list) -> None:
        super().__call__(jobs)
        _refuse(jobs)


@pytest.fixture
def lanes_engine(cache_dir: Path):
    made: list[Harness] = []

    def make(gate: Gate) -> Harness:
        hooks = EngineHooks(before_batch=gate)
        # Two lanes share a limit of 4: a batch takes 2 images before the second lane opens.
        harness = Harness(hooks, cache_dir, max_batch=4, engine_lanes=2)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def test_requests_spread_over_two_lanes_run_together_and_match_alone(
    lanes_engine, cache_dir: Path
) -> None:
    gate = Gate(1)
    h = lanes_engine(gate)
    requests = {
        name: {"prompt": f"a {color} circle", "seed": seed, "num_inference_steps": 4}
        for name, color, seed in (("a", "red", 1), ("b", "blue", 2), ("c", "green", 3))
    }
    h.submit("a", **requests["a"])
    assert gate.arrived.wait(30)  # a runs alone, on the engine's main thread
    h.submit("b", **requests["b"])
    h.submit("c", **requests["c"])
    gate.release.set()
    done = {name: h.finished(name) for name in requests}
    scheduler = h.scheduler
    # b filled a's batch to its share (2 of 4), c opened the second lane, and the two batches
    # stepped at the same time.
    steps = [{j for _, j, _ in step} for step in scheduler.step_log]
    assert {"a", "b"} in steps
    assert not any({"a", "c"} <= step or {"b", "c"} <= step for step in steps)
    assert scheduler.max_concurrent == 2
    loaded = load_pipeline(QuantSettings(cache_dir=cache_dir))
    for name, req in requests.items():
        alone = generate(
            loaded,
            GenerationRequest(
                req["prompt"],
                seed=req["seed"],
                num_inference_steps=4,
                width=16,
                height=16,
                guidance_scale=3.5,
            ),
        )
        got = np.asarray(done[name].result.images[0], dtype=np.int16)
        ref = np.asarray(alone.images[0], dtype=np.int16)
        assert int(np.abs(got - ref).max()) <= TOL, name


def test_a_failing_lane_fails_only_its_batch(lanes_engine) -> None:
    gate = _GateAndRefuse(1)
    h = lanes_engine(gate)
    h.submit("a", prompt="a red circle", num_inference_steps=3)
    assert gate.arrived.wait(30)
    h.submit("b", prompt="a blue circle", num_inference_steps=3)  # fills a's share
    h.submit("boom", prompt="boom", num_inference_steps=3)  # the second lane
    gate.release.set()
    failed = h.failed("boom")
    assert isinstance(failed.failure, EngineError)
    assert "refused by the test hook" in str(failed.failure)
    assert h.finished("a").result.width == 16
    assert h.finished("b").result.width == 16
    h.submit("after", prompt="a red circle")
    assert isinstance(h.finished("after"), m.Finished)


def test_with_lanes_a_batch_takes_4_then_a_lane_opens_then_the_emptiest_batch_fills() -> None:
    """The admission order at the CPU default (16 images, 2 lanes of up to 8): concurrency 4
    runs one batch of 4 on both threads, 8 two of 4, 16 two of 8."""
    from types import SimpleNamespace

    from engine.scheduler import LANE_FILL, Running, Scheduler

    class Stub:
        def __init__(self, images: int, cap: int = 8) -> None:
            self.images, self.cap = images, cap

        def __len__(self) -> int:
            return self.images

        def can_join(self, _req: object) -> bool:
            return self.images < self.cap

    scheduler = Scheduler(max_batch=16, emit=lambda _e: None, lanes=2)
    job = SimpleNamespace(request=None)

    def pick(sizes: list[int], can_open: bool, lanes: int = 2) -> int | None:
        scheduler._lanes_for = lambda _job: lanes  # type: ignore[method-assign]
        runs = [Running("k", ("kind",), Stub(n)) for n in sizes]  # type: ignore[arg-type]
        chosen = scheduler._pick(runs, job, can_open)  # type: ignore[arg-type]
        return None if chosen is None else len(chosen.batch)

    assert LANE_FILL == 4
    assert pick([3], can_open=True) == 3  # under 4: join it
    assert pick([4], can_open=True) is None  # 4 taken: open the second lane
    assert pick([4, 2], can_open=False) == 2  # the second lane fills to 4 too
    assert pick([6, 5], can_open=False) == 5  # then the emptiest batch with room
    assert pick([8, 8], can_open=False) is None  # both full: wait for a sample to leave
    assert pick([4], can_open=False) == 4  # no lane free: the batch grows past 4
    assert pick([7], can_open=True, lanes=1) == 7 and pick([8], True, lanes=1) is None


def test_with_lanes_every_new_batch_takes_its_share_of_the_limit() -> None:
    """The CPU's auto limit is 8 per lane (16 with 2): a whole-call batch (SD3, SDXL, edits)
    gets 8 too, as it did before the limit counted lanes; a bigger request still fits alone."""
    from types import SimpleNamespace

    from engine.scheduler import Scheduler

    made: list[int] = []

    def factory(_loaded: object, *, max_images: int, **_kw: object) -> object:
        made.append(max_images)
        return object()

    scheduler = Scheduler(max_batch=16, emit=lambda _e: None, lanes=2, make_batch=factory)
    for images in (1, 12):
        job = SimpleNamespace(key=None, loaded=None, request=SimpleNamespace(), images=images)
        scheduler._new_batch(job)  # type: ignore[arg-type]
    assert made == [8, 12]
