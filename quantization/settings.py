"""Quantization settings read from `QDS_*` environment variables (pydantic-settings).

Validation happens here, at start-up, so a bad value fails before any weight is read, with a
message that names the variable and the allowed values.
"""

from __future__ import annotations

from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quantization.backends import BACKENDS, get_backend
from quantization.planning.units import parse_bytes

KNOWN_COMPONENTS = (
    "transformer",
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "vae",
)
# QDS_QUANT_BACKEND=auto: a backend and type per component from quantization/planning/.
AUTO_BACKEND = "auto"
# Set while `QuantSettings.unprepared` builds settings whose artifacts `prepare` will make.
_UNPREPARED: ContextVar[bool] = ContextVar("qds_unprepared", default=False)


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
    quant_backend: str = Field(
        default="none",
        description="One of: "
        + ", ".join(BACKENDS)
        + "; or auto: per component, to fit QDS_MEMORY_BUDGET (docs/planning.md).",
    )
    quant_type: str | None = Field(
        default=None,
        description=(
            "Backend-specific: "
            + ", ".join(
                f"{'/'.join(b.quant_types)} ({b.key})" for b in BACKENDS.values() if b.quant_types
            )
            + ". Empty = the backend's default."
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
    memory_budget: int | None = Field(
        default=None,
        description="auto: bytes (or 16GB, 16GiB) the model may use; default the device's free "
        "memory minus 10%.",
    )
    priority: Literal["quality", "speed", "memory"] = Field(
        default="quality", description="auto: what to maximise among the plans that fit."
    )
    quality_check: bool = Field(
        default=False,
        description="After loading a quantized model, compare probe images with the "
        "unquantized model; refuse readiness below the floors.",
    )
    quality_floor_psnr: float = Field(
        default=30.0, ge=0, description="Quality check / auto: lowest PSNR (dB) accepted."
    )
    quality_floor_adherence: float = Field(
        default=0.75, ge=0, le=1, description="Quality check, demo model: lowest prompt adherence."
    )
    quality_references: Path | None = Field(
        default=None,
        description="Quality check: folder of recorded reference probes (instead of loading the "
        "unquantized model).",
    )

    @field_validator("components_to_quantize", "modules_to_not_convert", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("quant_backend")
    @classmethod
    def _backend_known(cls, value: str) -> str:
        key = value.strip().lower()
        if key not in BACKENDS and key != AUTO_BACKEND:
            raise ValueError(
                f"QDS_QUANT_BACKEND={value!r} is not a backend; allowed: "
                f"{', '.join(BACKENDS)}, {AUTO_BACKEND}"
            )
        return key

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget_size(cls, value: object) -> object:
        if value in (None, ""):
            return None
        # 0 is a budget of 0 bytes here (no plan fits it), not "no budget".
        return parse_bytes(value, "QDS_MEMORY_BUDGET")

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
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"QDS_DEVICE={self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if self.quant_backend == AUTO_BACKEND:
            return self._auto_options()
        # The backend owns its rules (quant types, text encoders, its own files).
        backend = get_backend(self.quant_backend)
        backend.validate_settings(self)
        # Another backend's own settings (QDS_GGUF_FILE) are refused, except unquantized: there
        # they may be set so that requests can ask for that backend's variant.
        for other in BACKENDS.values() if backend.quantizes else ():
            if other.key == backend.key:
                continue
            for name in other.own_settings:
                if getattr(self, name) is not None:
                    var = f"QDS_{name.upper()}"
                    raise ValueError(
                        f"{var} is set but QDS_QUANT_BACKEND={backend.key!r}; "
                        f"set QDS_QUANT_BACKEND={other.key} or unset {var}"
                    )
        if not _UNPREPARED.get():
            backend.validate_artifacts(self)
        return self

    def _auto_options(self) -> QuantSettings:
        if self.quant_type is not None:
            raise ValueError(
                f"QDS_QUANT_TYPE={self.quant_type!r} is set but QDS_QUANT_BACKEND=auto chooses "
                "the type per component; unset QDS_QUANT_TYPE"
            )
        for backend in BACKENDS.values():
            for name in backend.own_settings:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"QDS_{name.upper()} is set but QDS_QUANT_BACKEND=auto; set "
                        f"QDS_QUANT_BACKEND={backend.key} or unset QDS_{name.upper()}"
                    )
        return self

    @classmethod
    def unprepared(cls, **values: object) -> QuantSettings:
        """Settings whose offline artifacts (a .gguf file) do not exist yet, validated in
        every other way: pass them to `pipelines.loader.prepare(settings, work_dir)`."""
        token = _UNPREPARED.set(True)
        try:
            return cls(**values)  # type: ignore[arg-type]
        finally:
            _UNPREPARED.reset(token)

    @property
    def resolved_quant_type(self) -> str | None:
        if self.quant_backend == AUTO_BACKEND:
            return None
        return self.quant_type or get_backend(self.quant_backend).default_quant_type

    def with_backend(self, backend: str, quant_type: str | None = None) -> QuantSettings:
        """A copy for another backend (a cache variant), validated like the environment."""
        data = self.model_dump()
        data.update(quant_backend=backend, quant_type=quant_type)
        for other in BACKENDS.values():  # drop options that only another backend reads
            if other.key != backend:
                data.update(dict.fromkeys(other.own_settings))
        return type(self).model_validate(data)
