"""Model keys: one cache entry of the engine is one (model, backend, quant type, compute dtype).

The engine keys its model cache by them; the HTTP side (`service.variants`) turns a request's
`model` / `quant_backend` / `quant_type` into one. The public id is `model[:backend[:quant_type]]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.embedded import EMBEDDED_MODEL_ID
from quantization.settings import QuantSettings

SEP = ":"


@dataclass(frozen=True, order=True)
class ModelKey:
    model: str
    backend: str
    quant_type: str | None
    compute_dtype: str

    @property
    def variant_id(self) -> str:
        """The id `GET /v1/models` lists and `model` accepts: model:backend[:quant_type]."""
        return format_id(self.model, self.backend, self.quant_type)

    def label(self) -> str:
        return f"{self.backend}:{self.quant_type}" if self.quant_type else self.backend


def format_id(model: str, backend: str | None = None, quant_type: str | None = None) -> str:
    return SEP.join(p for p in (model, backend, quant_type) if p)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`backend[:quant_type]` (a QDS_PRELOAD entry or the tail of a model id)."""
    backend, _, qtype = spec.partition(SEP)
    return backend.strip(), qtype.strip() or None


def model_id(settings: QuantSettings) -> str:
    return EMBEDDED_MODEL_ID if settings.model in ("", "embedded") else settings.model


def key_for(settings: QuantSettings) -> ModelKey:
    """The cache key of a settings variant, with `auto` resolved so equal pipelines match."""
    from pipelines.loader import resolve_dtype
    from quantization.environment import resolve_device

    dtype = resolve_dtype(settings.compute_dtype, resolve_device(settings.device))
    backend = settings.quant_backend
    return ModelKey(
        model=model_id(settings),
        backend=backend,
        quant_type=None if backend == "none" else settings.resolved_quant_type,
        compute_dtype=str(dtype).removeprefix("torch."),
    )
