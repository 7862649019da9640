"""Quantization settings read from `QDS_*` environment variables (pydantic-settings).

Validation happens here, at start-up, so a bad value fails before any weight is read, with a
message that names the variable and the allowed values.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quantization.backends import BACKENDS, get_backend

KNOWN_COMPONENTS = (
    "transformer",
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "vae",
)
DENOISERS = ("transformer", "unet")


class OffloadMode(StrEnum):
    none = "none"
    model = "model"
    sequential = "sequential"


ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class QuantSettings(BaseSettings):
    """What to load and how to quantize it. Every field is `QDS_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="QDS_", extra="ignore", frozen=True)

    model: str = Field(
        default="embedded",
        description="Hub id, local diffusers folder, or `embedded` (the built-in small Flux).",
    )
    quant_backend: str = Field(default="none", description="One of: " + ", ".join(BACKENDS) + ".")
    quant_type: str | None = Field(
        default=None,
        description=(
            "Backend-specific: nf4/fp4 (bnb 4-bit), int8 (bnb 8-bit), int8/int4/int2/float8 "
            "(quanto), int8wo/int8dq/float8wo/float8dq/int4wo (torchao), FP8/INT8/INT4/NF4/"
            "NVFP4 (modelopt), Q8_0/Q5_1/Q5_0/Q4_1/Q4_0/F16/BF16 (gguf). Empty = the "
            "backend's default."
        ),
    )
    compute_dtype: ComputeDtype = Field(
        default="auto", description="auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    components_to_quantize: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["denoiser"],
        description="Comma list: denoiser (transformer or unet), text_encoder, text_encoder_2, ...",
    )
    gguf_file: Path | None = Field(default=None, description="Path of a .gguf denoiser file.")
    modules_to_not_convert: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of module names left unquantized."
    )
    bnb_double_quant: bool = Field(
        default=True, description="bitsandbytes 4-bit: quantize the quantization constants too."
    )
    offload: OffloadMode = Field(
        default=OffloadMode.none,
        description="none, model (enable_model_cpu_offload) or sequential.",
    )
    cache_dir: Path | None = Field(
        default=None, description="Where built / converted models are cached."
    )

    @field_validator("components_to_quantize", "modules_to_not_convert", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("quant_backend")
    @classmethod
    def _backend_known(cls, value: str) -> str:
        key = value.strip().lower()
        if key not in BACKENDS:
            raise ValueError(
                f"QDS_QUANT_BACKEND={value!r} is not a backend; allowed: {', '.join(BACKENDS)}"
            )
        return key

    @field_validator("quant_type")
    @classmethod
    def _empty_type(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("components_to_quantize")
    @classmethod
    def _components_known(cls, value: list[str]) -> list[str]:
        allowed = ("denoiser", *KNOWN_COMPONENTS)
        bad = [c for c in value if c not in allowed]
        if bad:
            raise ValueError(
                f"QDS_COMPONENTS_TO_QUANTIZE has unknown component(s) {bad}; "
                f"allowed: {', '.join(allowed)}"
            )
        if not value:
            raise ValueError("QDS_COMPONENTS_TO_QUANTIZE is empty; name at least one component")
        return value

    @model_validator(mode="after")
    def _backend_options(self) -> QuantSettings:
        backend = get_backend(self.quant_backend)
        qtype = self.quant_type or backend.default_quant_type
        if backend.quant_types and qtype not in backend.quant_types:
            raise ValueError(
                f"QDS_QUANT_TYPE={self.quant_type!r} is not a quant type of backend "
                f"{backend.key!r}; allowed: {', '.join(backend.quant_types)}"
            )
        encoders = [c for c in self.components_to_quantize if c.startswith("text_encoder")]
        if encoders and not backend.supports_text_encoders:
            raise ValueError(
                f"QDS_COMPONENTS_TO_QUANTIZE includes {encoders}, but backend {backend.key!r} "
                "cannot quantize transformers text encoders; use denoiser only"
            )
        if backend.key == "gguf":
            if self.gguf_file is None:
                raise ValueError(
                    "QDS_QUANT_BACKEND=gguf needs QDS_GGUF_FILE, the path of a .gguf denoiser "
                    "(make one with `qdserve convert-gguf`)"
                )
            if not self.gguf_file.is_file():
                raise ValueError(f"QDS_GGUF_FILE={str(self.gguf_file)!r} does not exist")
        elif self.gguf_file is not None and backend.key != "none":
            raise ValueError(
                f"QDS_GGUF_FILE is set but QDS_QUANT_BACKEND={backend.key!r}; "
                "set QDS_QUANT_BACKEND=gguf or unset QDS_GGUF_FILE"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"QDS_DEVICE={self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        return self

    @property
    def resolved_quant_type(self) -> str | None:
        return self.quant_type or get_backend(self.quant_backend).default_quant_type

    def with_backend(self, backend: str, quant_type: str | None = None) -> QuantSettings:
        """A copy for another backend (a cache variant), validated like the environment."""
        data = self.model_dump()
        data.update(quant_backend=backend, quant_type=quant_type)
        if backend != "gguf":
            data["gguf_file"] = None
        return type(self).model_validate(data)
