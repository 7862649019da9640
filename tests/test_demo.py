"""The demo model: procedural data, the pixel checker, and the shipped trained weights.

Not timed; each test stays well under 30 s on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from examples.demo import shapes
from examples.demo.checker import adheres, classify

WEIGHTS = Path(__file__).resolve().parent.parent / "quantization" / "demo_weights"


def test_dataset_is_deterministic() -> None:
    a = shapes.generate(40, seed=7, p_no_position=0.25)
    b = shapes.generate(40, seed=7, p_no_position=0.25)
    assert [s.caption for s in a] == [s.caption for s in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    other = shapes.generate(40, seed=8, p_no_position=0.25)
    assert [s.caption for s in other] != [s.caption for s in a]


def test_dataset_covers_every_attribute_and_captions_match() -> None:
    samples = shapes.generate(300, seed=0, p_no_position=0.25)
    assert {s.shape for s in samples} == set(shapes.SHAPES)
    assert {s.color for s in samples} == set(shapes.COLORS)
    assert {s.position for s in samples} == set(shapes.POSITIONS)
    for s in samples:
        shape, color, position = shapes.parse_caption(s.caption)
        assert (shape, color) == (s.shape, s.color)
        assert position in (None, s.position)
        assert s.image.size == (shapes.DEFAULT_SIZE, shapes.DEFAULT_SIZE)


def test_checker_agrees_with_captions() -> None:
    samples = shapes.generate(500, seed=12345)
    hits = 0
    for s in samples:
        v = classify(s.image)
        hits += v is not None and (v.shape, v.color, v.position) == (s.shape, s.color, s.position)
    assert hits / len(samples) >= 0.98


def test_checker_rejects_blank_and_noise() -> None:
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert classify(blank) is None
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not adheres(noise, "a blue square")


def test_adheres_ignores_unnamed_position() -> None:
    img = shapes.render("square", "blue", "right")
    assert adheres(img, "a blue square")
    assert adheres(img, "a blue square on the right")
    assert not adheres(img, "a blue square on the left")
    assert not adheres(img, "a red square")


@pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="no shipped weights")
def test_shipped_weights_draw_a_blue_square() -> None:
    import torch
    from diffusers import FluxPipeline

    from quantization.embedded import embedded_model_path

    assert embedded_model_path() == WEIGHTS
    meta = json.loads((WEIGHTS / "qdserve.json").read_text())
    pipe = FluxPipeline.from_pretrained(WEIGHTS)
    pipe.set_progress_bar_config(disable=True)
    # fp16 on disk, fp32 in memory: diffusers upcasts when no torch_dtype is given.
    assert pipe.transformer.dtype == torch.float32
    image = pipe(
        "a blue square",
        height=meta["default_size"],
        width=meta["default_size"],
        num_inference_steps=meta["default_steps"],
        guidance_scale=meta["default_guidance"],
        max_sequence_length=32,
        # Seed 0: with the shipped weights (3000 steps) 9 of seeds 0-9 give a blue square
        # (seed 1 gives a rounded blob the checker calls a circle); see docs/demo.md.
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    verdict = classify(image)
    assert verdict is not None
    assert (verdict.shape, verdict.color) == ("square", "blue")


def test_readme_first_request_draws_the_prompted_shape() -> None:
    """The README's curl request (seed 42) through the service's own loader and generator."""
    from quantization.generate import GenerationRequest, generate
    from quantization.loader import load_pipeline
    from quantization.settings import QuantSettings

    if not (WEIGHTS / "model_index.json").exists():
        pytest.skip("no shipped weights")
    loaded = load_pipeline(QuantSettings())  # QDS_MODEL unset: the embedded default
    image = generate(loaded, GenerationRequest(prompt="a red circle on the left", seed=42))
    verdict = classify(image.images[0])
    assert verdict is not None
    assert (verdict.shape, verdict.color, verdict.position) == ("circle", "red", "left")
