"""Save a quantized pipeline so it loads later without re-quantizing (`qdserve quantize`)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.loader import QDSERVE_META, load_pipeline
from quantization.backends import get_backend
from quantization.settings import QuantSettings


class NotSerializable(RuntimeError):
    pass


def quantize_and_save(settings: QuantSettings, out_dir: str | Path) -> Path:
    backend = get_backend(settings.quant_backend)
    quant_type = settings.resolved_quant_type
    if not backend.can_prequantize(quant_type):
        raise NotSerializable(backend.prequantize_refusal(quant_type))
    loaded = load_pipeline(settings)
    out = Path(out_dir)
    loaded.pipeline.save_pretrained(out, safe_serialization=backend.safe_serialization(quant_type))
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
