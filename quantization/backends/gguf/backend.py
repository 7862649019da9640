"""GGUF: a pre-quantized .gguf denoiser loaded with `from_single_file`.

The quant type is a property of the file; QDS_QUANT_TYPE names the type `qdserve
convert-gguf` (or `prepare`) writes. Text encoders stay in the model folder's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from quantization.backends.base import ConfigRequest, ModelLoadError, QuantBackend
from quantization.backends.gguf.convert import WRITABLE, convert_to_gguf

if TYPE_CHECKING:
    import torch

    from quantization.settings import QuantSettings


class GGUFBackend(QuantBackend):
    key = "gguf"
    order = 20
    module = "gguf"
    distribution = "gguf"
    # The types the `gguf` package can write (no K-quants); diffusers reads K-quants too.
    quant_types = WRITABLE
    default_quant_type = "Q8_0"
    supports_text_encoders = False
    own_settings = ("gguf_file",)
    bits: ClassVar[dict[str, float]] = {
        "Q8_0": 8.0,
        "Q5_1": 5.0,
        "Q5_0": 5.0,
        "Q4_1": 4.0,
        "Q4_0": 4.0,
        "F16": 16.0,
        "BF16": 16.0,
    }

    def allows_inference_mode(self, quant_type: str | None) -> bool:
        return True  # dequantizes per forward into fresh tensors

    def compiles_by_default(self, quant_type: str | None) -> bool:
        # Q8_0: 1.12x / 1.47x / 1.22x served (compile-serving-gguf-q8_0.md), 1/255
        # (compile.md); other types not measured compiled.
        return quant_type == "Q8_0"

    def validate_artifacts(self, settings: QuantSettings) -> None:
        if settings.gguf_file is None:
            raise ValueError(
                "QDS_QUANT_BACKEND=gguf needs QDS_GGUF_FILE, the path of a .gguf denoiser "
                "(make one with `qdserve convert-gguf`)"
            )
        if not settings.gguf_file.is_file():
            raise ValueError(f"QDS_GGUF_FILE={str(settings.gguf_file)!r} does not exist")

    def prepare(self, settings: QuantSettings, work_dir: Path, source: str) -> QuantSettings:
        """Convert the model's denoiser to `<work_dir>/<denoiser>-<type>.gguf` (unless
        QDS_GGUF_FILE already names a file) and return settings that load it."""
        if settings.gguf_file is not None and settings.gguf_file.is_file():
            return settings
        qtype = settings.resolved_quant_type or self.default_quant_type or "Q8_0"
        if not Path(source).is_dir():
            raise ValueError(
                f"QDS_MODEL={settings.model!r} is not a local folder; GGUF conversion needs "
                "one (save the pipeline locally or set QDS_GGUF_FILE)"
            )
        out = convert_to_gguf(source, Path(work_dir) / f"denoiser-{qtype}.gguf", qtype)
        return type(settings).model_validate({**settings.model_dump(), "gguf_file": out})

    def is_serializable(self, quant_type: str | None) -> bool:
        # diffusers' GGUF quantizer cannot save_pretrained; the .gguf file is the saved form.
        return False

    def prequantize_refusal(self, quant_type: str | None) -> str:
        return (
            "QDS_QUANT_BACKEND='gguf': nothing to pre-quantize; the .gguf file is the "
            "pre-quantized form (use `qdserve convert-gguf` for GGUF files)"
        )

    def diffusers_config(self, req: ConfigRequest) -> Any:
        return self.diffusers_config_class()(compute_dtype=req.compute_dtype)

    def load_denoiser(
        self,
        settings: QuantSettings,
        source: str,
        class_name: str,
        subfolder: str,
        dtype: torch.dtype,
    ) -> Any:
        import diffusers

        model_cls = getattr(diffusers, class_name)
        if not hasattr(model_cls, "from_single_file"):
            raise ModelLoadError(f"{class_name} cannot load single files; GGUF is not available")
        try:
            return model_cls.from_single_file(
                str(settings.gguf_file),
                quantization_config=self.diffusers_config(
                    ConfigRequest(quant_type=settings.resolved_quant_type, compute_dtype=dtype)
                ),
                config=source,
                subfolder=subfolder,
                torch_dtype=dtype,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"QDS_GGUF_FILE={str(settings.gguf_file)!r} could not be loaded as the "
                f"{subfolder} of {source}: {exc}"
            ) from exc
