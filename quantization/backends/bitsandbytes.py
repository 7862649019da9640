"""bitsandbytes 4-bit (nf4 / fp4, optional double quant) and 8-bit (LLM.int8)."""

from __future__ import annotations

from typing import Any, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend

_NO_GPU = "quanto (int8/int4) or torchao (int8wo), which run on CPU"


class BitsAndBytes4Bit(QuantBackend):
    key = "bitsandbytes_4bit"
    module = "bitsandbytes"
    distribution = "bitsandbytes"
    quant_types = ("nf4", "fp4")
    default_quant_type = "nf4"
    # diffusers' bnb quantizer refuses to run without a GPU ("No GPU found").
    needs_cuda = True
    alternatives = _NO_GPU
    order = 10
    bits: ClassVar[dict[str, float]] = {"nf4": 4.0, "fp4": 4.0}

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        return True  # measured on an H100 (docs/benchmarks/gpu-h100-run5/bnb_inference_mode.log)

    def matches_quant_method(self, quant_method: str, component_config: dict[str, Any]) -> bool:
        # diffusers and transformers both save `quant_method: "bitsandbytes"` for 4 and 8 bit.
        return quant_method == "bitsandbytes" and bool(component_config.get("load_in_4bit"))

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        return component_config.get("bnb_4bit_quant_type") or self.default_quant_type

    def _kwargs(self, req: ConfigRequest) -> dict[str, Any]:
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": req.quant_type or self.default_quant_type,
            "bnb_4bit_use_double_quant": req.bnb_double_quant,
            "bnb_4bit_compute_dtype": req.compute_dtype,
            "llm_int8_skip_modules": list(req.modules_to_not_convert) or None,
        }

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(**self._kwargs(req))

    def transformers_config(self, req: ConfigRequest) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**self._kwargs(req))


class BitsAndBytes8Bit(QuantBackend):
    key = "bitsandbytes_8bit"
    module = "bitsandbytes"
    distribution = "bitsandbytes"
    quant_types = ("int8",)
    default_quant_type = "int8"
    needs_cuda = True
    alternatives = _NO_GPU
    order = 11
    bits: ClassVar[dict[str, float]] = {"int8": 8.0}

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        return True  # measured on an H100 (docs/benchmarks/gpu-h100-run5/bnb_inference_mode.log)

    def matches_quant_method(self, quant_method: str, component_config: dict[str, Any]) -> bool:
        return quant_method == "bitsandbytes" and bool(component_config.get("load_in_8bit"))

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        return "int8"

    def _kwargs(self, req: ConfigRequest) -> dict[str, Any]:
        return {
            "load_in_8bit": True,
            "llm_int8_skip_modules": list(req.modules_to_not_convert) or None,
        }

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(**self._kwargs(req))

    def transformers_config(self, req: ConfigRequest) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**self._kwargs(req))
