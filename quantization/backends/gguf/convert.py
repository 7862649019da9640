"""Write a diffusers-format .gguf of a pipeline's denoiser with the `gguf` package.

Tensor names stay diffusers' own, so `from_single_file(..., config=<model dir>)` maps them
directly (the BFL-name converter in diffusers hard-codes Flux-dev sizes and cannot be used for
small models). Weights whose rows are not a multiple of the block size stay F32, as
llama.cpp's converters do for norms and biases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _quantizable(name: str, shape: tuple[int, ...], block_size: int) -> bool:
    # diffusers dequantizes GGUF tensors only inside Linear layers (2-D `.weight`); buffers
    # such as SD3's 3-D pos_embed and conv kernels must stay unquantized.
    return len(shape) == 2 and name.endswith(".weight") and shape[-1] % block_size == 0


# The types the `gguf` package can write (no K-quants), best first: the backend's quant types.
WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16")


def convert_to_gguf(model_dir: str | Path, out_path: str | Path, quant_type: str = "Q8_0") -> Path:
    import torch

    if quant_type not in WRITABLE:
        raise ValueError(
            f"quant type {quant_type!r} cannot be written; allowed: {', '.join(WRITABLE)}"
        )
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    denoiser = "transformer" if "transformer" in index else "unet"
    import diffusers

    model_cls = getattr(diffusers, index[denoiser][1])
    model = model_cls.from_pretrained(model_dir, subfolder=denoiser, torch_dtype=torch.float32)
    if getattr(model.config, "quantization_config", None):
        raise ValueError(f"{model_dir} is already quantized; convert an unquantized model")

    return write_gguf(
        model.state_dict(), out_path, quant_type, index["_class_name"].lower(), index[denoiser][1]
    )


def write_gguf(
    state_dict: dict[str, torch.Tensor],
    out_path: str | Path,
    quant_type: str,
    arch: str,
    class_name: str,
) -> Path:
    """Quantize a diffusers state dict into a .gguf file (diffusers tensor names)."""
    import gguf
    import numpy as np
    import torch

    qtype = gguf.GGMLQuantizationType[quant_type]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch=arch)
    writer.add_string("qdserve.denoiser_class", class_name)
    writer.add_string("qdserve.quant_type", quant_type)
    for name, tensor in state_dict.items():
        data = tensor.detach().to(torch.float32).contiguous().cpu().numpy()
        if _quantizable(name, data.shape, block_size):
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
