"""optimum-quanto weight quantization (deprecated in diffusers; removal planned for 1.0).

int4 / int2 compile a C++ extension on first use (about 30 s; needs g++ and ninja).
"""

from __future__ import annotations

from typing import Any, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend


class QuantoBackend(QuantBackend):
    key = "quanto"
    module = "optimum.quanto"
    distribution = "optimum-quanto"
    quant_types = ("int8", "int4", "int2", "float8")
    default_quant_type = "int8"
    order = 30
    # Every type saves and reloads bit-identically (measured: int8, int4, int2, float8).
    bits: ClassVar[dict[str, float]] = {"int8": 8.0, "int4": 4.0, "int2": 2.0, "float8": 8.0}

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        # diffusers saves `weights_dtype`, transformers `weights`.
        return component_config.get("weights_dtype") or component_config.get("weights")

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(
            weights_dtype=req.quant_type or self.default_quant_type,
            modules_to_not_convert=list(req.modules_to_not_convert) or None,
        )

    def transformers_config(self, req: ConfigRequest) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig(
            weights=req.quant_type or self.default_quant_type,
            modules_to_not_convert=list(req.modules_to_not_convert) or None,
        )

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        # int4/int2 weights set version counters in their kernels, which inference tensors
        # refuse ("Cannot set version_counter for inference tensor", optimum-quanto 0.2.7).
        return quant_type not in ("int4", "int2")

    def compiles_by_default(self, quant_type: str | None) -> bool:
        # int8: 1.29x / 1.50x / 1.11x served (compile-serving-quanto-int8.md), 0/255
        # (compile.md); other types not measured compiled.
        return quant_type == "int8"

    def lora_unsupported_reason(self, quant_type: str | None) -> str | None:
        # Measured for every quanto type by benchmarks/lora.py (docs/benchmarks/lora.md).
        return (
            "diffusers' LoRA loader reads each targeted layer's base weight as "
            "'<module>.weight' from the model's state dict, and quanto stores it as "
            "'weight._data' / 'weight._scale' (measured: KeyError: 'proj_out.weight' in "
            "load_lora_weights, diffusers 0.42.1, optimum-quanto 0.2.7); serve LoRAs on "
            "gguf, torchao (int8wo, int8dq, float8wo) or sdnq int8 instead"
        )
