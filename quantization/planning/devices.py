"""The device a plan is for (this machine's CUDA GPU or CPU, or one described on the command
line) and the memory budget on it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from quantization.environment import DeviceInfo
from quantization.planning.errors import PlanError
from quantization.planning.units import human, parse_bytes

# Policy, not a measurement: what is held back from the device's memory for what no table
# here measures (the CUDA context, allocator fragmentation, the server process itself).
DEFAULT_MARGIN_FRACTION = 0.10


def _size(value: str | int) -> int:
    """`parse_bytes` failing as a PlanError (`qdserve plan` reports those), same message."""
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


@dataclass(frozen=True)
class DeviceSpec:
    kind: Literal["cpu", "cuda"]
    name: str
    capability: tuple[int, int] | None
    total_bytes: int | None
    free_bytes: int | None
    described: bool

    @property
    def info(self) -> DeviceInfo:
        """What the backend registry's `unavailable_reason` checks."""
        return DeviceInfo(self.kind == "cuda", self.name, self.capability, self.total_bytes)

    @property
    def label(self) -> str:
        where = "described" if self.described else "this machine"
        if self.kind == "cpu":
            mem = f", {human(self.total_bytes)}" if self.total_bytes else ""
            return f"cpu{mem} ({where})"
        major, minor = self.capability or (0, 0)
        mem = human(self.total_bytes) if self.total_bytes else "memory unknown"
        return f"cuda {self.name}, compute capability {major}.{minor}, {mem} ({where})"


def describe_device(
    kind: str, capability: str | None = None, memory: str | None = None
) -> DeviceSpec:
    """A device that is not this machine: `--device cuda --capability 8.9 --memory 16GB`."""
    total = _size(memory) if memory else None
    if kind == "cpu":
        if total is None:
            return replace(detect_device_spec("cpu"), described=True)
        return DeviceSpec("cpu", "cpu", None, total, total, described=True)
    if kind != "cuda":
        raise PlanError(f"--device {kind!r}; allowed: cpu, cuda")
    if capability is None or total is None:
        raise PlanError(
            "a described CUDA device needs --capability (e.g. 8.9) and --memory (e.g. 16GB)"
        )
    try:
        major, minor = (int(p) for p in capability.split("."))
    except ValueError:
        raise PlanError(f"--capability {capability!r}; write it as MAJOR.MINOR, e.g. 8.9") from None
    return DeviceSpec(
        "cuda", f"GPU sm_{major}{minor}", (major, minor), total, total, described=True
    )


def detect_device_spec(device: str = "auto") -> DeviceSpec:
    """This machine: the CUDA GPU the model would use (free memory now), else the CPU."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceSpec("cuda", props.name, (props.major, props.minor), total, free, False)
    if device.startswith("cuda"):
        raise PlanError(f"QDS_DEVICE={device} but no CUDA GPU is visible; describe one or use cpu")
    import psutil

    mem = psutil.virtual_memory()
    return DeviceSpec("cpu", "cpu", None, mem.total, mem.available, False)


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str


def resolve_budget(
    device: DeviceSpec,
    requested: str | int | None,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
) -> Budget:
    if requested not in (None, ""):
        n = _size(requested)  # type: ignore[arg-type]
        return Budget(n, f"QDS_MEMORY_BUDGET={requested}")
    if device.free_bytes is None or device.total_bytes is None:
        raise PlanError("the device's memory is unknown; set QDS_MEMORY_BUDGET (e.g. 16GB)")
    margin = int(device.total_bytes * margin_fraction)
    what = "memory" if device.described else "free memory"
    return Budget(
        device.free_bytes - margin,
        f"the device's {what} {human(device.free_bytes)} minus a {margin_fraction:.0%} "
        f"safety margin ({human(margin)})",
    )
