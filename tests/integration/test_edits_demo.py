"""The demo model shows edits work: the pixel checker verifies inpainting and img2img on the
shipped weights (examples/demo/edits_check.py), through the service's own edit path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from examples.demo import edits_check
from pipelines import demo_shapes as shapes
from pipelines.demo_checker import classify

WEIGHTS = Path(__file__).resolve().parents[2] / "pipelines" / "demo_weights"
needs_weights = pytest.mark.skipif(
    not (WEIGHTS / "model_index.json").exists(), reason="no shipped weights"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on CPUs shared with other work, torch's default two spin against
    each other (this module ran 5x slower with them)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_checks_judge_drawings_as_intended() -> None:
    # What each check accepts, on procedural drawings (no model).
    assert edits_check.inpaint_ok(shapes.render("square", "blue", "left"))
    assert not edits_check.inpaint_ok(shapes.render("circle", "blue", "left"))
    assert not edits_check.inpaint_ok(edits_check.source_image())
    assert edits_check.keep_ok(edits_check.source_image())
    assert edits_check.keep_ok(shapes.render("circle", "purple", "left"))
    assert not edits_check.keep_ok(shapes.render("square", "red", "left"))
    assert not edits_check.keep_ok(shapes.render("circle", "red", "right"))
    assert edits_check.recolor_ok(shapes.render("circle", "blue", "left"))
    assert not edits_check.recolor_ok(edits_check.source_image())


def test_masks_mark_the_same_area_in_both_conventions() -> None:
    pipeline_mask = edits_check.left_half_mask()
    alpha = edits_check.openai_mask().getchannel("A")
    assert pipeline_mask.getbbox() == (0, 0, 16, 32)
    assert Image.eval(alpha, lambda a: 255 if a == 0 else 0).tobytes() == pipeline_mask.tobytes()
    # The mask covers the whole source circle (the left third would not).
    verdict = classify(edits_check.source_image())
    assert verdict is not None and verdict.position == "left"
    src = edits_check.source_image().load()
    reds = [x for x in range(32) for y in range(32) if src[x, y][1] < 200]  # type: ignore[index]
    assert max(reds) < 16 and max(reds) > 32 // 3


@pytest.fixture(scope="module")
def demo_pipe() -> object:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    return load_pipeline(QuantSettings()).pipeline  # the embedded demo model


@needs_weights
def test_shipped_weights_edit_rates(demo_pipe: object) -> None:
    scores = edits_check.edit_scores(demo_pipe)
    print(scores.summary())
    # Measured on seeds 0-5 (CPU, torch 2.13, 1 thread): inpaint 5/6 (seed 1 draws a blue
    # circle), keep 6/6, recolor 5/6 (seed 5 comes out purple). The thresholds allow one more
    # miss for other kernels and devices.
    assert scores.inpaint >= 4 / 6, scores
    assert scores.keep >= 5 / 6, scores
    assert scores.recolor >= 4 / 6, scores
