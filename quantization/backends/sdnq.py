"""SDNQ (SD.Next's quantization engine; package `sdnq`, diffusers' `sdnq` quantizer key).

Weights are stored packed in plain uint8 / float8 tensors with per-group scales (and zero
points for the unsigned types); layers are dequantized on the fly. It runs on CPU and GPU.
SDNQ leaves a model's sensitive layers in the compute dtype (for Flux: the time/text/x
embedders, norm_out, proj_out; and any layer under 16384 weights), so a small model keeps a
larger share unquantized than quanto or torchao do.

On CPU, sdnq's default torch.compile of its dequantize step compiles again for every new
input shape (measured on the demo model: the first 4-step image took 9 s, the first batch
of 4 another 7 s) and changes global dynamo limits at import; loading on CPU therefore
defaults SDNQ_USE_TORCH_COMPILE to 0 (eager) unless the operator has set it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend

# SDNQ weight dtypes offered (a subset of sdnq.common.accepted_weight_dtypes, from its
# recommended list), all measured to load and generate on CPU with sdnq 0.2.8.
SDNQ_TYPES: dict[str, float] = {
    "int8": 8.0,
    "int6": 6.0,
    "uint4": 4.0,
    "int4": 4.0,
    "float8_e4m3fn": 8.0,
}


class SDNQBackend(QuantBackend):
    key = "sdnq"
    module = "sdnq"
    distribution = "sdnq"
    quant_types = tuple(SDNQ_TYPES)
    default_quant_type = "int8"
    bits: ClassVar[dict[str, float]] = dict(SDNQ_TYPES)

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        return True  # every type checked on CPU (eager kernels)

    def _eager_on_cpu(self, device: str | None) -> None:
        if device is not None and not device.startswith("cuda"):
            # sdnq reads this once, at import: set it before diffusers imports sdnq.
            os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

    def _kwargs(self, req: ConfigRequest) -> dict[str, Any]:
        self._eager_on_cpu(req.device)
        return {
            "weights_dtype": req.quant_type or self.default_quant_type,
            "modules_to_not_convert": list(req.modules_to_not_convert) or None,
        }

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(**self._kwargs(req))

    def transformers_config(self, req: ConfigRequest) -> Any:
        kwargs = self._kwargs(req)
        # Importing sdnq registers its quantizer with transformers (transformers 5 has none).
        from sdnq import SDNQConfig

        return SDNQConfig(**kwargs)

    def before_loading_saved(self, device: str) -> None:
        self._eager_on_cpu(device)
        # transformers learns of SDNQ only when sdnq is imported; diffusers imports it only
        # for its own components. Without this a saved SDNQ text encoder, alone in a fresh
        # process, loaded as plain Linear layers and drew a different image (measured).
        import sdnq  # noqa: F401

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        return component_config.get("weights_dtype")

    def lora_unsupported_reason(self, quant_type: str | None) -> str | None:
        # Measured per type by benchmarks/lora.py (docs/benchmarks/lora.md), diffusers 0.42.1,
        # sdnq 0.2.8, peft 0.21.2, on CPU: int8 takes the demo LoRA (bit-exact base when off).
        qtype = quant_type or self.default_quant_type
        if qtype in ("uint4", "int4"):
            return (
                "diffusers' Flux LoRA loader reads each targeted layer's weight shape as "
                "(out, in), and sdnq stores 4-bit weights packed in a 1-D tensor (measured: "
                "ValueError: not enough values to unpack (expected 2, got 1)); use sdnq int8"
            )
        if qtype == "int6":
            return (
                "diffusers' Flux LoRA loader rebuilds a Linear from the stored weight, which "
                "sdnq packs as integers (measured: RuntimeError: Only Tensors of floating point "
                "and complex dtype can require gradients); use sdnq int8"
            )
        if qtype == "float8_e4m3fn":
            return (
                "the LoRA loads, but PEFT gives its layers the stored float8 dtype and the "
                "first forward fails (measured on CPU: NotImplementedError: "
                "\"mul_cpu_reduced_float\" not implemented for 'Float8_e4m3fn'); use sdnq int8"
            )
        return None
