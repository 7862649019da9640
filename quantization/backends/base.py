"""The strategy interface: one small class per backend key.

A backend knows its library, its quant types, what hardware it needs, and how to build the
diffusers config (for diffusers models) and the transformers config (for text encoders). It
also owns the decisions diffusers' `DiffusersQuantizer` makes for the same method: which
settings are valid, how the denoiser is loaded, whether and how a quantized model can be
saved, and whether a saved `quant_method` is its own. Configs are built lazily so that listing
backends never imports a quantization library.

Backends are listed explicitly in `auto.py` (key -> module:class), as diffusers'
`quantizers/auto.py` lists its quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from quantization.environment import DeviceInfo, library_version, module_available

if TYPE_CHECKING:
    import torch

    from quantization.settings import QuantSettings


class BackendUnavailable(RuntimeError):
    """This backend / quant type cannot run here; the message says why and what to use."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to fix."""


@dataclass(frozen=True)
class ConfigRequest:
    """What a backend needs to build its configs."""

    quant_type: str | None
    compute_dtype: torch.dtype
    modules_to_not_convert: tuple[str, ...] = ()
    bnb_double_quant: bool = True
    # Where the model will run ("cpu", "cuda", "cuda:N"); None when not known.
    device: str | None = None


class QuantBackend:
    key: ClassVar[str]
    # Position in listings: none first, the original backends in their order, new ones after.
    order: ClassVar[int] = 100
    # Import name and pip distribution of the library the backend needs (None: no library).
    module: ClassVar[str | None] = None
    distribution: ClassVar[str | None] = None
    quant_types: ClassVar[tuple[str, ...]] = ()
    default_quant_type: ClassVar[str | None] = None
    # False only for the baseline: nothing is quantized, nothing is reported as quantized.
    quantizes: ClassVar[bool] = True
    needs_cuda: ClassVar[bool] = False
    # Quant types that need CUDA even though the backend as a whole runs on CPU.
    cuda_only_types: ClassVar[tuple[str, ...]] = ()
    # Quant types that need CUDA compute capability >= 8.9 (float8 tensor cores).
    fp8_types: ClassVar[tuple[str, ...]] = ()
    # Quant types that need fp32 compute on CPU.
    cpu_fp32_only_types: ClassVar[tuple[str, ...]] = ()
    supports_text_encoders: ClassVar[bool] = True
    # QuantSettings fields that only this backend reads; other backends refuse them when set.
    own_settings: ClassVar[tuple[str, ...]] = ()
    alternatives: ClassVar[str] = "quanto or torchao (both run on CPU)"

    # Nominal bits per weight for each quant type (the physical floor: params x bits / 8).
    bits: ClassVar[dict[str, float]] = {}

    def weight_bits(self, quant_type: str | None) -> float:
        return self.bits.get(quant_type or "", 16.0)

    # --- settings ------------------------------------------------------------------------

    def validate_settings(self, settings: QuantSettings) -> None:
        """Refuse option combinations this backend cannot honour (start-up, before loading).

        Raises ValueError whose message names the QDS_ variable and what to set instead.
        """
        qtype = settings.quant_type or self.default_quant_type
        if self.quant_types and qtype not in self.quant_types:
            raise ValueError(
                f"QDS_QUANT_TYPE={settings.quant_type!r} is not a quant type of backend "
                f"{self.key!r}; allowed: {', '.join(self.quant_types)}"
            )
        encoders = [c for c in settings.components_to_quantize if c.startswith("text_encoder")]
        if encoders and not self.supports_text_encoders:
            raise ValueError(
                f"QDS_COMPONENTS_TO_QUANTIZE includes {encoders}, but backend {self.key!r} "
                "cannot quantize transformers text encoders; use denoiser only"
            )

    def validate_artifacts(self, settings: QuantSettings) -> None:
        """Refuse settings whose offline artifacts (files `prepare` makes) are missing."""

    def prepare(self, settings: QuantSettings, work_dir: Path, source: str) -> QuantSettings:
        """Create the offline artifacts this quant type needs in `work_dir` from the model
        folder `source` and return the settings that load them. Most backends quantize while
        loading: nothing to make. (`pipelines.loader.prepare` resolves `source` for callers.)

        `settings` may come from `QuantSettings.unprepared(...)` (artifact checks skipped);
        the result passes every check.
        """
        return settings

    # --- loading -------------------------------------------------------------------------

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

    def load_denoiser(
        self,
        settings: QuantSettings,
        source: str,
        class_name: str,
        subfolder: str,
        dtype: torch.dtype,
    ) -> Any | None:
        """The quantized denoiser, for backends that do not load through `from_pretrained`'s
        quant_mapping (GGUF single files). None: the pipeline loads it with the mapping."""
        return None

    # --- saving and saved folders ----------------------------------------------------------

    def is_serializable(self, quant_type: str | None) -> bool:
        """Whether diffusers can `save_pretrained` a model quantized with this type."""
        return True

    def safe_serialization(self, quant_type: str | None) -> bool:
        """Whether that save can use safetensors (else pickled .bin)."""
        return True

    def can_prequantize(self, quant_type: str | None) -> bool:
        """Whether `qdserve quantize` can write a pre-quantized folder for this type."""
        return self.quantizes and self.is_serializable(quant_type)

    def prequantize_refusal(self, quant_type: str | None) -> str:
        """Why `can_prequantize` is False, and what to do instead."""
        if not self.quantizes:
            return f"QDS_QUANT_BACKEND={self.key!r}: nothing to pre-quantize"
        return f"diffusers cannot save models quantized with {self.key} {quant_type or ''}".strip()

    def matches_quant_method(self, quant_method: str, component_config: dict[str, Any]) -> bool:
        """Whether a saved component was quantized by this backend.

        `quant_method` is diffusers' method string from the component's config.json, and
        `component_config` that component's saved `quantization_config` dict.
        """
        return self.quantizes and quant_method == self.key

    def before_loading_saved(self, device: str) -> None:
        """Ready the libraries to read a folder this backend saved, before `from_pretrained`
        runs on it (`device`: where it will run). Most need nothing."""

    def saved_quant_type(self, component_config: dict[str, Any]) -> str | None:
        """The quant type recorded in a saved `quantization_config`, when it says."""
        return None

    # --- running ------------------------------------------------------------------------------

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        """Whether this backend's kernels run under `torch.inference_mode` (the engine then
        uses it instead of `no_grad`: less autograd bookkeeping per op). Off unless checked for
        the backend (tests/backends/test_grad_mode.py runs each CPU one both ways): a kernel
        that sets a tensor's version counter fails there."""
        return False

    def compiles_by_default(self, quant_type: str | None) -> bool:
        """Whether QDS_COMPILE=auto compiles this quant type's denoiser on a CPU: only where a
        compiled server was measured faster as served (`bench compile-serving`) AND the
        compiled step loop gives the eager images within the stated 2/255 (`bench compile`)."""
        return False

    # --- LoRA adapters ---------------------------------------------------------------------

    def lora_unsupported_reason(self, quant_type: str | None) -> str | None:
        """Why diffusers/PEFT cannot apply a LoRA to a base quantized with this type (None: they
        can). Filled from the measured matrix (docs/benchmarks/lora.md), never from docs."""
        return None

    # --- availability --------------------------------------------------------------------

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
