"""GGUF: a pre-quantized .gguf denoiser loaded with `from_single_file`.

The quant type is a property of the file; QDS_QUANT_TYPE names the type `qdserve
convert-gguf` writes. Text encoders stay in the model folder's format.
"""

from __future__ import annotations

from typing import Any, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend


class GGUFBackend(QuantBackend):
    key = "gguf"
    module = "gguf"
    distribution = "gguf"
    # The types the `gguf` package can write (no K-quants); diffusers reads K-quants too.
    quant_types = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16")
    default_quant_type = "Q8_0"
    supports_text_encoders = False
    bits: ClassVar[dict[str, float]] = {
        "Q8_0": 8.0,
        "Q5_1": 5.0,
        "Q5_0": 5.0,
        "Q4_1": 4.0,
        "Q4_0": 4.0,
        "F16": 16.0,
        "BF16": 16.0,
    }

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(compute_dtype=req.compute_dtype)
