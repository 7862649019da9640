"""LoRA adapters (pipelines/lora.py) on the shipped demo model with the shipped demo LoRA.

The demo LoRA teaches the color orange, which the base model never saw: with the adapter the
checker sees orange shapes, without it none, and with no adapter requested the base output is
bit-exact whatever was loaded or swapped before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines import lora as lora_mod
from pipelines.demo_checker import adheres, classify
from pipelines.generate import warm_up_lora
from pipelines.lora import LoraError, LoraSpec, load_adapters, normalize_selection, parse_loras

SHIPPED = lora_mod.SHIPPED_DIR / "orange.safetensors"
# Three of the adapter's prompts; seed 0 draws each as asked with the adapter (measured).
PROMPTS = ["an orange circle on the left", "an orange square in the center", "an orange triangle"]


def _images(pipe: Any, prompts: list[str], steps: int = 12) -> np.ndarray:
    with torch.no_grad():
        out = pipe(
            prompts,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=32,
            generator=[torch.Generator().manual_seed(0) for _ in prompts],
            output_type="np",
        )
    return np.asarray(out.images)


def _pil(images: np.ndarray) -> list[np.ndarray]:
    return list((np.clip(images, 0, 1) * 255).round().astype("uint8"))


@pytest.fixture(scope="module")
def loaded() -> Any:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    torch.set_num_threads(1)
    return load_pipeline(QuantSettings(quant_backend="none", device="cpu"))


@pytest.fixture(scope="module")
def with_adapters(loaded: Any) -> tuple[Any, np.ndarray]:
    """The pipeline's base images, then the demo adapter declared twice (to test sets)."""
    base = _images(loaded.pipeline, PROMPTS)
    load_adapters(loaded, [LoraSpec("orange", str(SHIPPED)), LoraSpec("orange2", str(SHIPPED))])
    return loaded, base


def test_shipped_adapter_is_small() -> None:
    assert SHIPPED.is_file()
    assert SHIPPED.stat().st_size < 1_000_000


def test_loading_adapters_leaves_the_base_bit_exact(with_adapters: tuple[Any, np.ndarray]) -> None:
    loaded, base = with_adapters
    assert np.array_equal(_images(loaded.pipeline, PROMPTS), base)


def test_adapter_draws_orange_and_base_does_not(with_adapters: tuple[Any, np.ndarray]) -> None:
    loaded, base = with_adapters
    lora = lora_mod.adapters_of(loaded)
    assert lora is not None
    assert all(not adheres(img, p) for img, p in zip(_pil(base), PROMPTS, strict=True))
    assert all((classify(img) is None or classify(img).color != "orange") for img in _pil(base))
    lora_mod.activate(loaded, (("orange", 1.0),))
    try:
        images = _images(loaded.pipeline, PROMPTS)
        assert [adheres(img, p) for img, p in zip(_pil(images), PROMPTS, strict=True)] == [
            True
        ] * len(PROMPTS)
        assert lora.describe()[0]["state"] == "active"
    finally:
        lora_mod.activate(loaded, ())
    # Deactivated after a swap: bit-exact again.
    assert np.array_equal(_images(loaded.pipeline, PROMPTS), base)
    assert lora.describe()[0]["state"] == "loaded"


def test_two_adapters_at_half_scale_equal_one_at_full(
    with_adapters: tuple[Any, np.ndarray],
) -> None:
    loaded, _ = with_adapters
    try:
        lora_mod.activate(loaded, (("orange", 1.0),))
        full = _images(loaded.pipeline, PROMPTS[:1], steps=4)
        lora_mod.activate(loaded, (("orange2", 0.5), ("orange", 0.5)))
        halves = _images(loaded.pipeline, PROMPTS[:1], steps=4)
    finally:
        lora_mod.activate(loaded, ())
    # The same delta computed as one stacked rank-16 product instead of rank 8: rounding only
    # (measured max 1.8e-4 on the 0-255 scale).
    assert float(np.abs(full - halves).max()) * 255 < 0.01


def test_switching_changes_no_parameter_shapes(with_adapters: tuple[Any, np.ndarray]) -> None:
    loaded, _ = with_adapters
    transformer = loaded.pipeline.transformer
    before = {n: (p.data_ptr(), tuple(p.shape)) for n, p in transformer.named_parameters()}
    lora = lora_mod.adapters_of(loaded)
    switches = lora.switches
    try:
        assert lora_mod.adapters_of(loaded).activate((("orange", 0.7),))
        assert not lora.activate((("orange", 0.7),))  # same set and scale: nothing to do
        assert lora.activate((("orange2", 1.0),))
    finally:
        lora.activate(())
    assert lora.switches == switches + 3
    after = {n: (p.data_ptr(), tuple(p.shape)) for n, p in transformer.named_parameters()}
    assert after == before


def test_adapter_memory_is_counted(with_adapters: tuple[Any, np.ndarray]) -> None:
    loaded, _ = with_adapters
    lora = lora_mod.adapters_of(loaded)
    stored = sum(a.nbytes for a in lora.adapters.values())
    assert lora.rank == 16
    assert lora.nbytes == stored + lora.slot_bytes
    # fp32 in memory: the fp16 file's tensors at twice the bytes, twice (two declarations).
    assert stored == 2 * 2 * sum(_file_tensor_bytes(SHIPPED).values()) // 1
    assert lora_mod.adapter_bytes(loaded) == lora.nbytes


def _file_tensor_bytes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).nbytes for k in f.keys()}  # noqa: SIM118


def test_unknown_adapter_is_refused(with_adapters: tuple[Any, np.ndarray]) -> None:
    loaded, _ = with_adapters
    with pytest.raises(LoraError, match=r"unknown LoRA adapter\(s\) 'nope'; declared: orange, "):
        lora_mod.activate(loaded, (("nope", 1.0),))


# -- declarations -------------------------------------------------------------------------
def test_parse_loras_forms(tmp_path: Path) -> None:
    f = tmp_path / "style.safetensors"
    f.write_bytes(b"")
    specs = parse_loras(f" orange , style={f}, hub=user/repo:weights.safetensors, plain=user/repo")
    assert specs == [
        LoraSpec("orange", str(SHIPPED)),
        LoraSpec("style", str(f)),
        LoraSpec("hub", "user/repo", "weights.safetensors"),
        LoraSpec("plain", "user/repo"),
    ]
    assert parse_loras("") == [] and parse_loras(None) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bad name=x", "the name must match"),
        ("a=x,a=y", "declares 'a' twice"),
        ("a=", "empty source"),
        ("purple", "no shipped adapter has that name (shipped: orange)"),
    ],
)
def test_parse_loras_refusals(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_loras(text)


def test_normalize_selection_sorts_and_drops_zero_scales() -> None:
    assert normalize_selection([("b", 1), ("a", 0.5), ("c", 0.0)]) == (("a", 0.5), ("b", 1.0))


# -- backend refusals -----------------------------------------------------------------------
@dataclass
class _Loaded:
    backend: str
    quant_type: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def test_refusal_names_the_backend_and_reason() -> None:
    with pytest.raises(LoraError) as err:
        lora_mod.refuse_unsupported(_Loaded("quanto", "int8"))  # type: ignore[arg-type]
    assert str(err.value).startswith(
        "QDS_LORAS is set but backend quanto int8 cannot take a LoRA: "
    )
    assert "KeyError" in str(err.value)
    lora_mod.refuse_unsupported(_Loaded("none", None))  # type: ignore[arg-type]


def test_refusal_covers_auto_plans() -> None:
    plan = {"components": {"transformer": {"backend": "quanto", "quant_type": "int4"}}}
    with pytest.raises(LoraError, match="backend quanto int4"):
        lora_mod.refuse_unsupported(_Loaded("auto", None, {"plan": plan}))  # type: ignore[arg-type]


def test_quanto_really_cannot_take_the_demo_lora() -> None:
    """The fact behind the quanto refusal, re-measured: diffusers' Flux LoRA loader reads the
    base weight as `<module>.weight`, which a quanto-quantized model does not have."""
    pytest.importorskip("optimum.quanto")
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    loaded = load_pipeline(QuantSettings(quant_backend="quanto", quant_type="int8", device="cpu"))
    with pytest.raises(KeyError, match=r"\.weight"):
        loaded.pipeline.load_lora_weights(str(SHIPPED), adapter_name="orange")


def test_adapters_with_text_encoder_layers_are_refused(
    with_adapters: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    loaded, base = with_adapters
    encoder = CLIPTextModel.from_pretrained(
        Path(lora_mod.__file__).parent / "demo_weights/text_encoder"
    )
    # PEFT itself: transformers 5.24's add_adapter wants peft >= 0.22 (the registry has 0.21).
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), encoder)
    transformer = {k.removeprefix("transformer."): v for k, v in load_file(SHIPPED).items()}
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=transformer,
        text_encoder_lora_layers=get_peft_model_state_dict(encoder),
        weight_name="both.safetensors",
    )
    with pytest.raises(LoraError, match="has LoRA layers for text_encoder; qdserve applies"):
        load_adapters(loaded, [LoraSpec("both", str(tmp_path / "both.safetensors"))])
    # The refused file was removed again: the base output is untouched.
    assert np.array_equal(_images(loaded.pipeline, PROMPTS), base)


@pytest.mark.slow
def test_switching_adapters_does_not_recompile_the_compiled_denoiser() -> None:
    """QDS_COMPILE (CPU scope: the whole denoiser) with the slot: after one warm-up per slot state
    (off, on), switching sets and scales compiles nothing new (dynamo's frame counter)."""
    from torch._dynamo.utils import counters

    from engine.core import compile_denoiser
    from pipelines.generate import GenerationRequest, generate
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    loaded = load_pipeline(QuantSettings(quant_backend="none", device="cpu"))
    lora_mod.attach(
        loaded,
        [LoraSpec("orange", str(SHIPPED)), LoraSpec("orange2", str(SHIPPED))],
        required=True,
    )
    compile_denoiser(loaded)

    def run(*selection: tuple[str, float]) -> None:
        generate(loaded, GenerationRequest("a", num_inference_steps=2, seed=0, lora=selection))

    run()
    warm_up_lora(loaded, [(32, 32)])
    compiled = counters["frames"]["total"]
    assert compiled > 0
    for selection in [("orange", 1.0)], [("orange2", 0.5)], [], [("orange", 1.0), ("orange2", 2.0)]:
        run(*selection)
    assert counters["frames"]["total"] == compiled


def test_a_file_diffusers_cannot_read_is_refused_with_the_backend(
    with_adapters: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    loaded, _ = with_adapters
    with pytest.raises(LoraError) as err:
        load_adapters(loaded, [LoraSpec("empty", str(tmp_path))])
    message = str(err.value)
    assert message.startswith(f"QDS_LORAS empty={tmp_path}: diffusers could not load it: ")
    assert message.endswith("(backend none)")


def test_backend_refusals_match_the_measured_matrix() -> None:
    """Every CPU cell of docs/benchmarks/lora.json (benchmarks/lora.py): the backend refuses
    a LoRA exactly where diffusers could not apply it or the forward with it failed."""
    import json

    from quantization.backends import get_backend

    path = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "lora.json"
    cells = [c for c in json.loads(path.read_text())["matrix"]["cells"] if c.get("measured")]
    assert len(cells) >= 15
    for cell in cells:
        works = bool(cell.get("applies")) and not cell.get("forward_error")
        reason = get_backend(cell["backend"]).lora_unsupported_reason(cell["quant_type"])
        assert (reason is None) == works, (cell["backend"], cell["quant_type"], reason)
        if reason is not None:
            measured = cell.get("error") or cell.get("forward_error")
            assert measured.split(": ", 1)[1].strip("'\"")[:30] in reason, (reason, measured)
