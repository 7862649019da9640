"""QDS_COMPILE (default auto: on for Flux step batching on a CPU with a C++ compiler):
the compiled step loop (whole model or repeated blocks, QDS_COMPILE_SCOPE) keeps the
same-seed guarantee, its warm-up compiles every graph a request meets (no compile after it,
at any batch size, on the main thread or a lane), and auto turns itself off where it was
not measured or cannot run.

Measured here (torch 2.13 CPU, embedded random model, 32x32, 4 steps): compiled StepBatch
alone and joined mid-batch vs the eager pipeline call, max abs pixel difference asserted
within tests/backends/test_stepping.py's TOL (2/255).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engine import compiling
from engine.lanes import Lanes
from pipelines.generate import GenerationRequest, generate, resolve
from pipelines.loader import LoadedPipeline, load_pipeline
from pipelines.stepping import StepBatch
from quantization.settings import QuantSettings

TOL = 2


def _px(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im).astype(np.int16) for im in images])


def _req(loaded: LoadedPipeline, seed: int) -> GenerationRequest:
    return resolve(
        loaded.defaults,
        GenerationRequest("a red circle on the left", seed=seed, num_inference_steps=4),
    )


def _drain(batch: StepBatch, join: tuple[str, GenerationRequest] | None = None) -> dict:
    out: dict[str, Any] = {}
    steps = 0
    while len(batch):
        if join is not None and steps == 1:
            batch.add(*join)
        out.update(dict(batch.step()))
        steps += 1
    return out


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_steps_keep_the_same_seed_image_and_never_compile_after_warm_up(
    embedded_path: Path, scope: str
) -> None:
    from torch._dynamo.utils import counters

    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    reqs = [_req(loaded, seed) for seed in (3, 4, 5, 6)]
    eager = {r.seed: _px(generate(loaded, r).images) for r in reqs}

    compiling.compile_denoiser(loaded, scope)
    size = loaded.defaults.size
    compiling.default_warmup(loaded, [(size, size)], lanes=2)
    frames = counters["frames"]["total"]
    assert frames > 0  # the warm-up compiled

    alone = StepBatch(loaded, max_images=8)
    alone.add("a", reqs[0])
    assert int(np.abs(_px(_drain(alone)["a"].images) - eager[3]).max()) <= TOL

    # Three at once, a fourth joining after one step (its own schedule, a batch of 3 then 4).
    batch = StepBatch(loaded, max_images=8)
    batch.add_many([(str(r.seed), r) for r in reqs[1:3]])
    batch.add("5x", replace(reqs[0], seed=5, num_images=1))
    results = _drain(batch, join=("6", reqs[3]))
    for seed in (4, 5, 6):
        key = "5x" if seed == 5 else str(seed)
        assert int(np.abs(_px(results[key].images) - eager[seed]).max()) <= TOL, seed

    # Batch sizes the warm-up did not run, on the main thread and on two lanes at once.
    for images in (3, 5):
        b = StepBatch(loaded, max_images=8)
        b.add("x", replace(reqs[0], num_images=images))
        _drain(b)
    pair = [StepBatch(loaded, max_images=8) for _ in range(2)]
    for i, b in enumerate(pair):
        b.add(str(i), replace(reqs[i], num_images=3 + i))
    while len(pair[0]) or len(pair[1]):
        Lanes.get(2).run_or_raise([b.step for b in pair])
    assert counters["frames"]["total"] == frames, "a request met a compile the warm-up skipped"
    compiling.uncompile(loaded)


def test_auto_turns_itself_off_where_not_measured_or_not_possible(
    embedded_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    assert compiling.compile_decision(True, loaded)[0] is True
    assert compiling.compile_decision(False, loaded)[0] is False
    on, why = compiling.compile_decision("auto", loaded)
    assert on is (compiling.cpp_compiler() is not None), why

    monkeypatch.setattr(compiling, "cpp_compiler", lambda: None)
    on, why = compiling.compile_decision("auto", loaded)
    assert not on and "no C++ compiler" in why
    monkeypatch.undo()

    monkeypatch.setattr(compiling, "cpp_compiler", lambda: "g++")
    for backend, qtype, on in [
        ("none", None, True),
        ("quanto", "int8", True),
        ("quanto", "int4", False),
        ("torchao", "int8wo", True),
        ("torchao", "int8dq", False),  # 31/255 from eager when compiled (compile.md)
        ("gguf", "Q8_0", True),
        ("sdnq", "int8", False),
    ]:
        variant = SimpleNamespace(
            device="cpu", pipeline=loaded.pipeline, extra={}, backend=backend, quant_type=qtype
        )
        decided, why = compiling.compile_decision("auto", variant)  # type: ignore[arg-type]
        assert decided is on, (backend, qtype, why)
        if not on:
            assert f"{backend}:{qtype}" in why and "2/255" in why
    # A planned mix (QDS_QUANT_BACKEND=auto) compiles only if every choice does.
    mixed = SimpleNamespace(
        device="cpu",
        pipeline=loaded.pipeline,
        backend="auto",
        quant_type=None,
        extra={
            "plan": {
                "components": {
                    "transformer": {"backend": "torchao", "quant_type": "int8wo"},
                    "text_encoder_2": {"backend": "torchao", "quant_type": "int8dq"},
                }
            }
        },
    )
    assert not compiling.compile_decision("auto", mixed)[0]  # type: ignore[arg-type]

    gpu = SimpleNamespace(device="cuda:0", pipeline=loaded.pipeline)
    on, why = compiling.compile_decision("auto", gpu)  # type: ignore[arg-type]
    assert not on and "cuda:0" in why
    # QDS_COMPILE_SCOPE: auto is the whole model on a CPU, the repeated blocks elsewhere.
    assert compiling.compile_scope("auto", loaded) == "model"
    assert compiling.compile_scope("auto", gpu) == "blocks"  # type: ignore[arg-type]
    assert compiling.compile_scope("blocks", loaded) == "blocks"
    assert compiling.compile_scope("model", gpu) == "model"  # type: ignore[arg-type]

    monkeypatch.setattr(compiling, "uses_stepping", lambda _loaded: False)
    on, why = compiling.compile_decision("auto", loaded)
    assert not on and "whole-call" in why
