"""benchmarks/lora.py's reports (no model): every kind of cell renders, and docs/quality.md's
LoRA section survives the quality report rewriting the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import lora
from benchmarks.common import run_meta
from examples.demo import quality

CELLS: list[dict[str, Any]] = [
    {
        "backend": "none",
        "quant_type": None,
        "measured": True,
        "applies": True,
        "output_changes": True,
        "orange_adherence_with": 0.96,
        "orange_adherence_without": 0.0,
        "base_prompt_adherence_with": 0.95,
        "base_bit_exact_disabled": True,
        "base_bit_exact_unloaded": True,
        "slot": {
            "applies": True,
            "orange_adherence_with": 0.96,
            "bit_exact_after_load": True,
            "bit_exact_deactivated": True,
        },
    },
    {
        "backend": "quanto",
        "quant_type": "int8",
        "measured": True,
        "applies": False,
        "error": "KeyError: 'proj_out.weight'",
        "orange_adherence_without": 0.0,
        "base_bit_exact_after_failed_load": True,
    },
    {
        "backend": "sdnq",
        "quant_type": "float8_e4m3fn",
        "measured": True,
        "applies": True,
        "forward_error": "NotImplementedError: no float8 mul",
        "orange_adherence_without": 0.0,
        "base_bit_exact_unloaded": True,
    },
    {"backend": "modelopt", "quant_type": "FP8", "measured": False, "unavailable": "needs CUDA"},
]


def _matrix() -> dict[str, Any]:
    return {
        "meta": run_meta("test"),
        "adapter": "pipelines/demo_weights/lora/orange.safetensors",
        "prompts": 12,
        "seeds": [0, 1],
        "steps": 12,
        "cells": CELLS,
        "versions": {"peft": "0.21.2"},
    }


def test_matrix_renders_every_kind_of_cell() -> None:
    text = lora.render({"matrix": _matrix()})
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| none | yes | yes | 96% / 0% | 95% | yes | yes | 96% / yes |")
    assert "**no**: KeyError: 'proj_out.weight'" in rows[1]
    assert "yes, but the forward with it fails: NotImplementedError" in rows[2]
    assert rows[3].startswith("| modelopt FP8 | not measured here: needs CUDA |")
    assert lora.headline({"matrix": _matrix()}) == (
        "1 of 3 CPU variants take the demo LoRA (not all of: quanto, sdnq)"
    )


def test_quality_report_keeps_the_lora_section(tmp_path: Path) -> None:
    md = tmp_path / "quality.md"
    md.write_text("# Quality per backend (demo model)\n\nold table\n")
    lora.write_quality_section(md, _matrix())
    lora.write_quality_section(md, _matrix())  # replaced, not appended twice
    section = md.read_text().split(quality.SECTION_BEGIN, 1)[1]
    assert md.read_text().count(quality.SECTION_BEGIN) == 1
    assert "| quanto:int8 | - | 0% | - | - | LoRA does not load: KeyError" in section
    from PIL import Image

    images = [Image.new("RGB", (32, 32), "white")] * len(quality.PROMPTS)
    row = quality.Row("none", adherence=1.0, images=images)
    quality.write_report([row], md, tmp_path / "q.png")
    text = md.read_text()
    assert "old table" not in text and "| none | 100.0% |" in text
    assert text.endswith(quality.SECTION_BEGIN + section)  # kept, byte for byte
    assert text.count(quality.SECTION_BEGIN) == 1
