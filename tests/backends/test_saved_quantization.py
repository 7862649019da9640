"""Pre-quantized folders saved by plain diffusers (no qdserve.json) are recognised by their
backend from the component's saved `quantization_config`, reading JSON only (no GPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.loader import SavedQuantization, load_pipeline, saved_quantization
from quantization.backends import BackendUnavailable, ModelLoadError
from quantization.settings import QuantSettings

COMPONENTS = {"transformer": "diffusers", "text_encoder_2": "transformers", "vae": "diffusers"}

BNB_4BIT = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
    "llm_int8_skip_modules": None,
}
BNB_8BIT = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True}


def _folder(root: Path, source: Path, quantized: dict[str, dict[str, Any]]) -> Path:
    """A pipeline folder's JSON files (no weights), as diffusers' save_pretrained writes them."""
    shutil.copy(source / "model_index.json", root / "model_index.json")
    for config in source.glob("*/config.json"):
        (root / config.parent.name).mkdir()
        data = json.loads(config.read_text())
        if config.parent.name in quantized:
            data["quantization_config"] = quantized[config.parent.name]
        (root / config.parent.name / "config.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (BNB_4BIT, SavedQuantization("bitsandbytes_4bit", "fp4", ("transformer",))),
        (BNB_8BIT, SavedQuantization("bitsandbytes_8bit", "int8", ("transformer",))),
        (
            {"quant_method": "quanto", "weights_dtype": "int4"},
            SavedQuantization("quanto", "int4", ("transformer",)),
        ),
        (
            {"quant_method": "sdnq", "weights_dtype": "uint4", "group_size": 0},
            SavedQuantization("sdnq", "uint4", ("transformer",)),
        ),
        (
            {
                "quant_method": "torchao",
                "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_data": {}}},
            },
            SavedQuantization("torchao", "int8wo", ("transformer",)),
        ),
    ],
)
def test_plain_diffusers_folder_names_its_backend(
    tmp_path: Path, embedded_path: Path, config: dict[str, Any], expected: SavedQuantization
) -> None:
    folder = _folder(tmp_path, embedded_path, {"transformer": config})
    assert saved_quantization(str(folder), COMPONENTS) == expected


def test_every_quantized_component_is_listed(tmp_path: Path, embedded_path: Path) -> None:
    # transformers writes the same quant_method for a text encoder saved with bitsandbytes.
    folder = _folder(tmp_path, embedded_path, {"transformer": BNB_4BIT, "text_encoder_2": BNB_4BIT})
    saved = saved_quantization(str(folder), COMPONENTS)
    assert saved == SavedQuantization("bitsandbytes_4bit", "fp4", ("transformer", "text_encoder_2"))


def test_unquantized_folder_is_not_pre_quantized(tmp_path: Path, embedded_path: Path) -> None:
    assert saved_quantization(str(_folder(tmp_path, embedded_path, {})), COMPONENTS) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_plain_bitsandbytes_folder_is_refused_as_bitsandbytes_on_cpu(
    tmp_path: Path, embedded_path: Path
) -> None:
    # Before: reported as unquantized ("none") and handed to from_pretrained.
    folder = _folder(tmp_path, embedded_path, {"transformer": BNB_4BIT})
    with pytest.raises(BackendUnavailable, match="bitsandbytes_4bit needs an NVIDIA CUDA GPU"):
        load_pipeline(QuantSettings(model=str(folder)))


def test_other_backend_requested_for_a_plain_bitsandbytes_folder(
    tmp_path: Path, embedded_path: Path
) -> None:
    folder = _folder(tmp_path, embedded_path, {"transformer": BNB_8BIT})
    with pytest.raises(ModelLoadError, match="already quantized with bitsandbytes_8bit"):
        load_pipeline(QuantSettings(model=str(folder), quant_backend="quanto"))


def test_unknown_quant_method_is_named(tmp_path: Path, embedded_path: Path) -> None:
    folder = _folder(tmp_path, embedded_path, {"transformer": {"quant_method": "auto-round"}})
    with pytest.raises(ModelLoadError, match="quantized with 'auto-round', which no qdserve"):
        saved_quantization(str(folder), COMPONENTS)
