"""String-keyed backend registry (the keys are diffusers' own quantization method keys).

Each module in this package defines one or more `QuantBackend` subclasses, which register
themselves; importing every module here is all the wiring a new backend needs.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from quantization.backends.base import BackendUnavailable, ConfigRequest, QuantBackend, registered

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

BACKENDS: dict[str, QuantBackend] = {cls.key: cls() for cls in registered()}


def get_backend(key: str) -> QuantBackend:
    try:
        return BACKENDS[key]
    except KeyError:
        raise ValueError(f"unknown backend {key!r}; allowed: {', '.join(BACKENDS)}") from None


def backend_for_saved(quant_method: str, component_config: dict[str, Any]) -> QuantBackend | None:
    """The backend that wrote a saved component's `quantization_config`, if one is registered."""
    return next(
        (b for b in BACKENDS.values() if b.matches_quant_method(quant_method, component_config)),
        None,
    )


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ConfigRequest",
    "QuantBackend",
    "backend_for_saved",
    "get_backend",
]
