"""torchao: user-facing strings mapped to torchao config objects.

diffusers >= 0.38 rejects string quant types, so the mapping lives here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend
from quantization.environment import DeviceInfo, module_available

# user string -> torchao.quantization config class name
TORCHAO_TYPES: dict[str, str] = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "float8wo": "Float8WeightOnlyConfig",
    "float8dq": "Float8DynamicActivationFloat8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
}


def torchao_config_object(quant_type: str) -> Any:
    import torchao.quantization as tq

    return getattr(tq, TORCHAO_TYPES[quant_type])()


class TorchAoBackend(QuantBackend):
    key = "torchao"
    module = "torchao"
    distribution = "torchao"
    quant_types = tuple(TORCHAO_TYPES)
    default_quant_type = "int8wo"
    order = 40
    # int4 weight-only needs a CUDA kernel package; float8 dynamic needs float8 matmuls.
    cuda_only_types = ("int4wo", "float8dq")
    fp8_types = ("float8dq",)
    cpu_fp32_only_types = ("float8wo",)
    bits: ClassVar[dict[str, float]] = {
        "int8wo": 8.0,
        "int8dq": 8.0,
        "float8wo": 8.0,
        "float8dq": 8.0,
        "int4wo": 4.0,
    }

    def unavailable_reason(
        self, quant_type: str | None, device: DeviceInfo, compute_dtype: str | None = None
    ) -> str | None:
        reason = super().unavailable_reason(quant_type, device, compute_dtype)
        if reason is None and quant_type == "int4wo" and not module_available("mslk"):
            # torchao 0.17/0.18 int4 weight-only needs the mslk kernel package (measured:
            # "ImportError: Requires mslk >= 1.0.0" on an H200).
            return "torchao int4wo needs the mslk kernel package (pip install mslk>=1.0)"
        return reason

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        # Checked on CPU, float8dq on an H100 (docs/benchmarks/gpu-h100-run5); int4wo never ran.
        return quant_type != "int4wo"

    def compiles_by_default(self, quant_type: str | None) -> bool:
        # int8wo: 1.09x / 1.52x / 1.16x served (compile-serving-torchao-int8wo.md), 0/255.
        # int8dq is 31/255 off its eager images compiled (compile.md): outside 2/255.
        return quant_type == "int8wo"

    def safe_serialization(self, quant_type: str | None) -> bool:
        # torchao tensor subclasses are not safetensors-serializable in diffusers 0.42.
        return False

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        # diffusers saves the config object as {"default": {"_type": "<class name>", ...}}.
        saved = component_config.get("quant_type")
        if isinstance(saved, dict):
            saved = (saved.get("default") or {}).get("_type")
        return next((k for k, cls in TORCHAO_TYPES.items() if cls == saved), None)

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(
            torchao_config_object(req.quant_type or self.default_quant_type),
            modules_to_not_convert=list(req.modules_to_not_convert) or None,
        )

    def transformers_config(self, req: ConfigRequest) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig(
            quant_type=torchao_config_object(req.quant_type or self.default_quant_type),
            modules_to_not_convert=list(req.modules_to_not_convert) or None,
        )
