"""The explicit list of backends: key -> the module and class that implement it.

As diffusers' `quantizers/auto.py` maps each `quant_method` to its config and quantizer, this
table maps each backend key (diffusers' own method strings) to its strategy class. A new
backend is its module plus one line here. Each module is imported on its own: one that fails
to import (a syntax error, a library that breaks at import time) is reported in `BROKEN` with
the error and left out, and every other backend keeps working.
"""

from __future__ import annotations

import importlib
import logging

from quantization.backends.base import QuantBackend

log = logging.getLogger("qdserve.backends")

# In listing order: none first, the original backends, then the newer ones.
AUTO_BACKEND_MAPPING: dict[str, str] = {
    "none": "quantization.backends.none:NoneBackend",
    "bitsandbytes_4bit": "quantization.backends.bitsandbytes:BitsAndBytes4Bit",
    "bitsandbytes_8bit": "quantization.backends.bitsandbytes:BitsAndBytes8Bit",
    "gguf": "quantization.backends.gguf.backend:GGUFBackend",
    "quanto": "quantization.backends.quanto:QuantoBackend",
    "torchao": "quantization.backends.torchao:TorchAoBackend",
    "modelopt": "quantization.backends.modelopt:ModelOptBackend",
    "sdnq": "quantization.backends.sdnq:SDNQBackend",
}


def load_backends(
    mapping: dict[str, str] | None = None,
) -> tuple[dict[str, QuantBackend], dict[str, str]]:
    """(key -> backend instance, key -> why it could not be imported)."""
    backends: dict[str, QuantBackend] = {}
    broken: dict[str, str] = {}
    for key, target in (AUTO_BACKEND_MAPPING if mapping is None else mapping).items():
        module_name, _, class_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # one broken backend must not take the registry down
            broken[key] = f"{type(exc).__name__}: {exc}"
            log.error("backend %s could not be imported (%s): %s", key, target, broken[key])
            continue
        if cls.key != key:
            raise TypeError(f"{target} defines key {cls.key!r}, listed as {key!r}")
        backends[key] = cls()
    return backends, broken
