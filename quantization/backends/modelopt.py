"""NVIDIA ModelOpt (TensorRT Model Optimizer) quantization: GPU only.

diffusers 0.42 builds NVIDIAModelOptConfig with nvidia-modelopt <= 0.43.x; 0.47 fails with
"'list' object is not a mapping". Unknown quant types silently fall back to FP8 inside
diffusers, so the type is validated here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from packaging.version import Version

from quantization.backends.base import ConfigRequest, QuantBackend
from quantization.environment import DeviceInfo

MAX_MODELOPT = Version("0.44")


class ModelOptBackend(QuantBackend):
    key = "modelopt"
    module = "modelopt"
    distribution = "nvidia-modelopt"
    quant_types = ("FP8", "INT8", "INT4", "NF4", "NVFP4")
    default_quant_type = "FP8"
    order = 50
    needs_cuda = True
    fp8_types = ("FP8",)
    supports_text_encoders = False
    alternatives = "quanto or torchao (both run on CPU)"
    bits: ClassVar[dict[str, float]] = {
        "FP8": 8.0,
        "INT8": 8.0,
        "INT4": 4.0,
        "NF4": 4.0,
        "NVFP4": 4.0,
    }

    def version_problem(self) -> str | None:
        version = self.library_version()
        if version and Version(version) >= MAX_MODELOPT:
            return (
                f"nvidia-modelopt {version} is newer than diffusers supports "
                f"(NVIDIAModelOptConfig fails); install nvidia-modelopt<{MAX_MODELOPT}"
            )
        return None

    def unavailable_reason(
        self, quant_type: str | None, device: DeviceInfo, compute_dtype: str | None = None
    ) -> str | None:
        reason = super().unavailable_reason(quant_type, device, compute_dtype)
        version = self.library_version()
        if reason is None and version and Version(version) < MAX_MODELOPT:
            # Measured on an H200 (torch 2.11, diffusers 0.42.1, nvidia-modelopt 0.43.0): the
            # model loads, then every forward fails with "linear(): argument 'weight' must be
            # Tensor, not FP8QTensor" (INT8QTensor for INT8; conv2d for SD3). Refuse at start-up
            # instead of failing every request.
            return (
                f"nvidia-modelopt {version} with diffusers 0.42 loads weights it cannot run "
                "(forward fails: 'linear() ... not FP8QTensor', measured on H200); "
                "use torchao float8dq or bitsandbytes_8bit for 8-bit on GPU"
            )
        return reason

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        return component_config.get("quant_type")

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(
            quant_type=req.quant_type or self.default_quant_type,
            modules_to_not_convert=list(req.modules_to_not_convert) or None,
        )
