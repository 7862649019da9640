"""`allows_inference_mode` is a measured fact per backend: each CPU variant runs one step-loop
request under `torch.inference_mode`, and the engine's step batches use it where allowed."""

from __future__ import annotations

import pytest

from quantization.backends import BACKENDS, get_backend

# (backend, quant type) that run on this CPU; gguf needs a converted file (its engine tests
# run it through grad_mode).
CPU_VARIANTS = [
    ("none", None),
    ("quanto", "int8"),
    ("quanto", "int4"),
    ("torchao", "int8wo"),
    ("sdnq", "int8"),
]


@pytest.mark.parametrize(("backend", "quant_type"), CPU_VARIANTS)
def test_inference_mode_runs_exactly_where_the_backend_says_it_does(
    backend: str, quant_type: str | None
) -> None:
    import torch

    from pipelines.generate import GenerationRequest, allows_inference_mode, grad_mode, resolve
    from pipelines.loader import load_pipeline
    from pipelines.stepping import StepBatch
    from quantization.settings import QuantSettings

    pytest.importorskip(get_backend(backend).module or "torch")
    loaded = load_pipeline(QuantSettings(quant_backend=backend, quant_type=quant_type))
    req = resolve(
        loaded.defaults,
        GenerationRequest("a red circle", seed=3, width=32, height=32, num_inference_steps=2),
    )

    def run() -> None:
        with torch.inference_mode():
            batch = StepBatch(loaded)
            batch.add("a", req)
            while not batch.step():
                pass

    allowed = get_backend(backend).allows_inference_mode(quant_type)
    if allowed:
        run()
    else:
        with pytest.raises(RuntimeError, match="Cannot set version_counter for inference tensor"):
            run()
    # The engine's step batch picks the mode by itself, on any thread.
    batch = StepBatch(loaded)
    batch.add("a", req)
    assert batch._jobs["a"].latents.is_inference() is allowed
    with grad_mode(allows_inference_mode(loaded)):
        assert torch.is_inference_mode_enabled() is allowed
        assert not torch.is_grad_enabled()
    assert batch.step() == [] and len(batch.step()) == 1


def test_cuda_only_backends_follow_the_recorded_gpu_check() -> None:
    """bitsandbytes and torchao float8dq ran under inference_mode on an H100
    (docs/benchmarks/gpu-h100-run5/bnb_inference_mode.log); ModelOpt and torchao int4wo never
    ran there and keep no_grad."""
    from pathlib import Path

    log = Path(__file__).parents[2] / "docs/benchmarks/gpu-h100-run5/bnb_inference_mode.log"
    ran = {
        tuple(line.split()[:2])
        for line in log.read_text().splitlines()
        if "inference_mode ok" in line
    }
    on = {
        (b.key, t)
        for b in BACKENDS.values()
        for t in (b.quant_types or (None,))
        if b.allows_inference_mode(t)
    }
    cuda_on = {(k, t) for k, t in on if k in ("bitsandbytes_4bit", "bitsandbytes_8bit")}
    cuda_on |= {("torchao", "float8dq")} & on
    assert cuda_on == ran
    assert not any(k == "modelopt" for k, _ in on)
    assert ("torchao", "int4wo") not in on
    assert not {("quanto", "int4"), ("quanto", "int2")} & on


def test_an_auto_plan_runs_in_inference_mode_only_if_every_choice_allows_it() -> None:
    from types import SimpleNamespace

    import torch

    from pipelines.generate import allows_inference_mode, grad_mode

    def loaded(*choices: tuple[str, str | None]) -> object:
        components = {f"c{i}": {"backend": b, "quant_type": t} for i, (b, t) in enumerate(choices)}
        return SimpleNamespace(
            backend="auto", quant_type=None, extra={"plan": {"components": components}}
        )

    for choices, expected in (
        ((("quanto", "int8"), ("none", None)), True),
        ((("quanto", "int4"), ("torchao", "int8wo")), False),
    ):
        with grad_mode(allows_inference_mode(loaded(*choices))):  # type: ignore[arg-type]
            assert torch.is_inference_mode_enabled() is expected
