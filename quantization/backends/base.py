"""The strategy interface: one small class per backend key.

A backend knows its library, its quant types, what hardware it needs, and how to build the
diffusers config (for diffusers models) and the transformers config (for text encoders).
Configs are built lazily so that listing backends never imports a quantization library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from quantization.environment import DeviceInfo, library_version, module_available

if TYPE_CHECKING:
    import torch


class BackendUnavailable(RuntimeError):
    """This backend / quant type cannot run here; the message says why and what to use."""


@dataclass(frozen=True)
class ConfigRequest:
    """What a backend needs to build its configs."""

    quant_type: str | None
    compute_dtype: torch.dtype
    modules_to_not_convert: tuple[str, ...] = ()
    bnb_double_quant: bool = True


class QuantBackend:
    key: ClassVar[str]
    # Import name and pip distribution of the library the backend needs (None: no library).
    module: ClassVar[str | None] = None
    distribution: ClassVar[str | None] = None
    quant_types: ClassVar[tuple[str, ...]] = ()
    default_quant_type: ClassVar[str | None] = None
    needs_cuda: ClassVar[bool] = False
    # Quant types that need CUDA even though the backend as a whole runs on CPU.
    cuda_only_types: ClassVar[tuple[str, ...]] = ()
    # Quant types that need CUDA compute capability >= 8.9 (float8 tensor cores).
    fp8_types: ClassVar[tuple[str, ...]] = ()
    # Quant types that need fp32 compute on CPU.
    cpu_fp32_only_types: ClassVar[tuple[str, ...]] = ()
    supports_text_encoders: ClassVar[bool] = True
    # Whether diffusers can save_pretrained() a model quantized with this backend.
    serializable: ClassVar[bool] = True
    alternatives: ClassVar[str] = "quanto or torchao (both run on CPU)"

    # Nominal bits per weight for each quant type (the physical floor: params x bits / 8).
    bits: ClassVar[dict[str, float]] = {}

    def weight_bits(self, quant_type: str | None) -> float:
        return self.bits.get(quant_type or "", 16.0)

    def diffusers_config_class(self) -> type:
        # Reuse diffusers' own key -> config class mapping instead of restating it.
        from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

        return AUTO_QUANTIZATION_CONFIG_MAPPING[self.key]

    def diffusers_config(self, req: ConfigRequest) -> Any:
        raise NotImplementedError

    def transformers_config(self, req: ConfigRequest) -> Any:
        raise BackendUnavailable(
            f"backend {self.key!r} cannot quantize transformers text encoders; "
            "quantize only the denoiser (QDS_COMPONENTS_TO_QUANTIZE=denoiser)"
        )

    def unavailable_reason(
        self, quant_type: str | None, device: DeviceInfo, compute_dtype: str | None = None
    ) -> str | None:
        """Why this backend / quant type cannot run on `device`, or None if it can."""
        if self.quant_types and quant_type not in self.quant_types:
            return (
                f"{quant_type!r} is not a quant type of {self.key}; "
                f"allowed: {', '.join(self.quant_types)}"
            )
        if self.module and not module_available(self.module):
            return f"library {self.distribution} is not installed (pip install {self.distribution})"
        if version_problem := self.version_problem():
            return version_problem
        if self.needs_cuda and not device.cuda:
            return (
                f"{self.key} needs an NVIDIA CUDA GPU and none was found; use {self.alternatives}"
            )
        if quant_type in self.cuda_only_types and not device.cuda:
            return f"{self.key} {quant_type} needs a CUDA GPU; use {self.alternatives}"
        if quant_type in self.fp8_types and device.cuda and (device.capability or (0, 0)) < (8, 9):
            cap = ".".join(map(str, device.capability or (0, 0)))
            return (
                f"{self.key} {quant_type} needs CUDA compute capability >= 8.9 (Ada/Hopper) for "
                f"float8; {device.name} has {cap}. Use an int8 quant type instead"
            )
        if (
            quant_type in self.cpu_fp32_only_types
            and not device.cuda
            and compute_dtype not in (None, "auto", "float32")
        ):
            return f"{self.key} {quant_type} on CPU needs QDS_COMPUTE_DTYPE=float32"
        return None

    def version_problem(self) -> str | None:
        return None

    def check(
        self, quant_type: str | None, device: DeviceInfo, compute_dtype: str | None = None
    ) -> None:
        if reason := self.unavailable_reason(quant_type, device, compute_dtype):
            raise BackendUnavailable(reason)

    def library_version(self) -> str | None:
        return library_version(self.distribution) if self.distribution else None
