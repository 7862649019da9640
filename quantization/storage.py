"""Count the real storage bytes of a (possibly quantized) module.

`ModelMixin.get_memory_footprint()` mis-reports quanto (it sees the wrapper's float dtype and
returns a ratio of 1.0) and torchao, so this walks the tensors themselves: tensor subclasses
are flattened through `__tensor_flatten__` (quanto, torchao), bitsandbytes 4-bit weights add
their quantization state, GGUF parameters are raw bytes. Shared storages are counted once.

The parameter count (what the same weights cost unquantized) comes from the architecture
itself, rebuilt from the module's config on the meta device (no memory): quantizers that pack
weights into plain uint8 tensors (SDNQ flattens 4-bit weights into half as many bytes and adds
scale / zero-point parameters) leave nothing on the loaded tensors to recover the logical
shape from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("qdserve.storage")


@dataclass(frozen=True)
class StorageReport:
    """Bytes held by one component, and what the same parameters cost unquantized."""

    storage_bytes: int
    parameters: int
    quantized_parameters: int

    def unquantized_bytes(self, dtype: torch.dtype) -> int:
        return self.parameters * dtype.itemsize


def _plain_bytes(t: torch.Tensor, seen: set[tuple[int, int]]) -> int:
    if t.device.type == "meta":
        return 0
    key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
    if key in seen:
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def _quant_state_bytes(state: Any, seen: set[tuple[int, int]]) -> int:
    # bitsandbytes QuantState: absmax (+ nested state2 when double-quantized), code table.
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            total += _plain_bytes(value, seen)
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested, seen)
    return total


def tensor_bytes(t: torch.Tensor, seen: set[tuple[int, int]] | None = None) -> int:
    """Real bytes behind `t`, recursing into quantized tensor subclasses."""
    seen = set() if seen is None else seen
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        try:
            names, _ctx = t.__tensor_flatten__()
        except Exception:  # a subclass whose flatten needs tracing context: fall through
            names = None
        if names:
            return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    total = _plain_bytes(t, seen)
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += _quant_state_bytes(state, seen)
    return total


def logical_numel(t: torch.Tensor) -> int:
    """Number of weights the tensor represents (not the packed storage elements)."""
    if hasattr(t, "quant_shape"):  # GGUF: storage is bytes, quant_shape the logical shape
        return int(torch.Size(t.quant_shape).numel())
    state = getattr(t, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:  # bnb 4-bit
        return int(torch.Size(state.shape).numel())
    return t.numel()


def is_quantized_tensor(t: torch.Tensor) -> bool:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return True  # a subclass: quanto, torchao, GGUF, bnb
    return t.dtype in (torch.int8, torch.uint8) or t.dtype.itemsize == 1


def reference_shapes(module: torch.nn.Module) -> dict[str, torch.Size] | None:
    """Parameter name -> shape of the same architecture unquantized, or None if the module
    cannot be rebuilt from its config (then the loaded tensors are read instead)."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    cls = type(module)
    try:
        with torch.device("meta"):
            if hasattr(config, "items"):  # diffusers: a frozen dict of __init__ arguments
                kwargs = {k: v for k, v in config.items() if k != "quantization_config"}
                fresh = cls.from_config(kwargs)  # type: ignore[attr-defined]
            else:  # transformers: a PretrainedConfig
                fresh = cls(config)
    except Exception as exc:  # an architecture that needs more than its config to build
        log.debug("cannot rebuild %s on meta: %s", cls.__name__, exc)
        return None
    return {name: p.shape for name, p in fresh.named_parameters()}


def _kept_unquantized(loaded: torch.Tensor | None, shape: torch.Size) -> bool:
    return (
        loaded is not None
        and type(loaded) in (torch.Tensor, torch.nn.Parameter)
        and loaded.shape == shape
        and loaded.dtype.is_floating_point
        and loaded.dtype.itemsize > 1
    )


def module_storage(module: torch.nn.Module) -> StorageReport:
    seen: set[tuple[int, int]] = set()
    storage = params = quantized = 0
    # Buffers count too: some quantizers keep scales there. `seen` drops shared storages.
    for t in [*module.parameters(), *module.buffers()]:
        storage += tensor_bytes(t, seen)
    reference = reference_shapes(module)
    if reference is not None:
        loaded = dict(module.named_parameters())
        for name, shape in reference.items():
            params += shape.numel()
            if not _kept_unquantized(loaded.get(name), shape):
                quantized += shape.numel()
        return StorageReport(storage, params, quantized)
    for p in module.parameters():
        n = logical_numel(p)
        params += n
        if is_quantized_tensor(p):
            quantized += n
    return StorageReport(storage_bytes=storage, parameters=params, quantized_parameters=quantized)
