"""Facts about this machine that decide which backends can run: CUDA, capability, libraries."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DeviceInfo:
    """The accelerator the model will run on (or its absence)."""

    cuda: bool
    name: str
    capability: tuple[int, int] | None = None
    total_memory: int | None = None

    @property
    def label(self) -> str:
        if not self.cuda:
            return "cpu"
        major, minor = self.capability or (0, 0)
        return f"{self.name} (sm_{major}{minor})"


@lru_cache(maxsize=1)
def detect_device() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(True, props.name, (props.major, props.minor), props.total_memory)
    return DeviceInfo(False, "cpu")


def resolve_device(requested: str) -> str:
    """`auto` -> `cuda` when CUDA is present, else `cpu`; explicit values pass through."""
    if requested == "auto":
        return "cuda" if detect_device().cuda else "cpu"
    return requested


def library_version(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
