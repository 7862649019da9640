"""String-keyed backend registry (the keys are diffusers' own quantization method keys)."""

from __future__ import annotations

from quantization.backends.base import BackendUnavailable, ConfigRequest, QuantBackend
from quantization.backends.bitsandbytes import BitsAndBytes4Bit, BitsAndBytes8Bit
from quantization.backends.gguf import GGUFBackend
from quantization.backends.modelopt import ModelOptBackend
from quantization.backends.none import NoneBackend
from quantization.backends.quanto import QuantoBackend
from quantization.backends.torchao import TorchAoBackend

BACKENDS: dict[str, QuantBackend] = {
    b.key: b
    for b in (
        NoneBackend(),
        BitsAndBytes4Bit(),
        BitsAndBytes8Bit(),
        GGUFBackend(),
        QuantoBackend(),
        TorchAoBackend(),
        ModelOptBackend(),
    )
}


def get_backend(key: str) -> QuantBackend:
    try:
        return BACKENDS[key]
    except KeyError:
        raise ValueError(f"unknown backend {key!r}; allowed: {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "BackendUnavailable", "ConfigRequest", "QuantBackend", "get_backend"]
