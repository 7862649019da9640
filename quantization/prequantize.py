"""Save a quantized pipeline so it loads later without re-quantizing (`qdserve quantize`)."""

from __future__ import annotations

import json
from pathlib import Path

from quantization.backends import get_backend
from quantization.loader import QDSERVE_META, load_pipeline
from quantization.settings import QuantSettings


class NotSerializable(RuntimeError):
    pass


def quantize_and_save(settings: QuantSettings, out_dir: str | Path) -> Path:
    backend = get_backend(settings.quant_backend)
    if backend.key in ("none", "gguf"):
        raise NotSerializable(
            f"QDS_QUANT_BACKEND={backend.key!r}: nothing to pre-quantize "
            "(use `qdserve convert-gguf` for GGUF files)"
        )
    if not backend.serializable:
        raise NotSerializable(f"diffusers cannot save models quantized with {backend.key}")
    loaded = load_pipeline(settings)
    out = Path(out_dir)
    # torchao tensor subclasses are not safetensors-serializable in diffusers 0.42.
    safe = backend.key != "torchao"
    loaded.pipeline.save_pretrained(out, safe_serialization=safe)
    meta_src = Path(loaded.model_path) / QDSERVE_META
    meta = json.loads(meta_src.read_text()) if meta_src.is_file() else {}
    meta.update(
        backend=backend.key,
        quant_type=loaded.quant_type,
        source_model=loaded.model,
        components_quantized=[n for n, c in loaded.components.items() if c.quantized],
    )
    (out / QDSERVE_META).write_text(json.dumps(meta, indent=2))
    return out
