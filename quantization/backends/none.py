"""No quantization: the pipeline in its compute dtype (the baseline every ratio is against)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend

if TYPE_CHECKING:
    from quantization.settings import QuantSettings


class NoneBackend(QuantBackend):
    key = "none"
    order = 0
    quantizes = False
    bits: ClassVar[dict[str, float]] = {}

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        return True

    def compiles_by_default(self, quant_type: str | None) -> bool:
        # compile-serving.md (whole denoiser): 1.20x / 1.16x / 1.12x at 1 / 4 / 16; 0/255
        # (compile.md).
        return True

    def validate_settings(self, settings: QuantSettings) -> None:
        # Any quant type and component list is moot, and other backends' options (such as
        # QDS_GGUF_FILE) may be set so that requests can ask for those variants while the
        # default serves the model unquantized.
        return None

    def is_serializable(self, quant_type: str | None) -> bool:
        return False

    def diffusers_config(self, req: ConfigRequest) -> None:
        return None

    def transformers_config(self, req: ConfigRequest) -> None:
        return None
