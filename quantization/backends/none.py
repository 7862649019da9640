"""No quantization: the pipeline in its compute dtype (the baseline every ratio is against)."""

from __future__ import annotations

from typing import ClassVar

from quantization.backends.base import ConfigRequest, QuantBackend


class NoneBackend(QuantBackend):
    key = "none"
    bits: ClassVar[dict[str, float]] = {}

    def diffusers_config(self, req: ConfigRequest) -> None:
        return None

    def transformers_config(self, req: ConfigRequest) -> None:
        return None
