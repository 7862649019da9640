"""String-keyed backend registry (the keys are diffusers' own quantization method keys).

`auto.py` lists every backend explicitly; a backend whose module fails to import is left out
and named in `BROKEN` (with the error) instead of breaking the registry.
"""

from __future__ import annotations

from typing import Any

from quantization.backends.auto import load_backends
from quantization.backends.base import (
    BackendUnavailable,
    ConfigRequest,
    ModelLoadError,
    QuantBackend,
)

BACKENDS: dict[str, QuantBackend]
BROKEN: dict[str, str]
BACKENDS, BROKEN = load_backends()


def get_backend(key: str) -> QuantBackend:
    try:
        return BACKENDS[key]
    except KeyError:
        if key in BROKEN:
            raise ValueError(f"backend {key!r} failed to import: {BROKEN[key]}") from None
        raise ValueError(f"unknown backend {key!r}; allowed: {', '.join(BACKENDS)}") from None


def backend_for_saved(quant_method: str, component_config: dict[str, Any]) -> QuantBackend | None:
    """The backend that wrote a saved component's `quantization_config`, if one is registered."""
    return next(
        (b for b in BACKENDS.values() if b.matches_quant_method(quant_method, component_config)),
        None,
    )


__all__ = [
    "BACKENDS",
    "BROKEN",
    "BackendUnavailable",
    "ConfigRequest",
    "ModelLoadError",
    "QuantBackend",
    "backend_for_saved",
    "get_backend",
]
