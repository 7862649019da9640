"""Planning from settings and the command line: `qdserve plan` (`plan_request`: each flag, else
its `QDS_*` variable) and the loader's `QDS_QUANT_BACKEND=auto` step (`auto_quantization`: the
plan for the device the model will run on, and the per-component quant_mapping that loads it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from quantization.planning import tables
from quantization.planning.devices import (
    DEFAULT_MARGIN_FRACTION,
    DeviceSpec,
    describe_device,
    detect_device_spec,
    resolve_budget,
)
from quantization.planning.model_spec import read_model_spec
from quantization.planning.search import Plan, make_plan


def plan_model(
    model: str,
    device: DeviceSpec,
    budget: str | int | None = None,
    priority: str = "quality",
    floor: float = tables.DEFAULT_PSNR_FLOOR,
    compute_dtype: str = "auto",
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    display: str | None = None,
) -> Plan:
    spec = read_model_spec(model, display=display)
    return make_plan(
        spec,
        device,
        resolve_budget(device, budget, margin_fraction),
        priority,
        floor,
        compute_dtype,
    )


def plan_request(
    model: str | None = None,
    device: str | None = None,
    capability: str | None = None,
    memory: str | None = None,
    budget: str | None = None,
    priority: str | None = None,
    floor: float | None = None,
    environ: Mapping[str, str] | None = None,
    display: str | None = None,
) -> Plan:
    """`qdserve plan`: each flag, else its QDS_* variable, else the default.

    No `--capability` / `--memory` plans for this machine (`--device cpu` for its CPU); with
    them, for the described device.
    """
    env = os.environ if environ is None else environ
    if capability is None and memory is None:
        spec = detect_device_spec(device or env.get("QDS_DEVICE", "auto"))
    else:
        spec = describe_device(device or "cuda", capability, memory)
    return plan_model(
        model or env.get("QDS_MODEL", "embedded"),
        spec,
        budget or env.get("QDS_MEMORY_BUDGET") or None,
        priority or env.get("QDS_PRIORITY", "quality"),
        floor
        if floor is not None
        else float(env.get("QDS_QUALITY_FLOOR_PSNR", tables.DEFAULT_PSNR_FLOOR)),
        env.get("QDS_COMPUTE_DTYPE", "auto"),
        display=display,
    )


def plan_for_load(
    model_id: str,
    source: str,
    device: str,
    memory_budget: str | int | None,
    priority: str,
    floor: float,
    compute_dtype: str,
) -> Plan:
    """The loader's `QDS_QUANT_BACKEND=auto` step: plan for the device the model will run on."""
    spec = read_model_spec(source, display=model_id)
    dev = detect_device_spec(device)
    return make_plan(spec, dev, resolve_budget(dev, memory_budget), priority, floor, compute_dtype)


def quant_mapping(plan: Plan, request: Callable[[str | None], Any]) -> dict[str, Any]:
    """component -> diffusers / transformers quantization config for each quantized choice.

    `request(quant_type)` builds the backend's ConfigRequest (the loader knows the dtype, the
    device and the modules left unconverted). The result is a `quant_mapping` for diffusers'
    PipelineQuantizationConfig: each component carries its own backend's config.
    """
    from quantization.backends import get_backend

    mapping: dict[str, Any] = {}
    for comp in plan.components:
        if not comp.quantized:
            continue
        backend = get_backend(comp.choice.backend)
        req = request(comp.choice.quant_type)
        if comp.library == "diffusers":
            mapping[comp.name] = backend.diffusers_config(req)
        else:
            mapping[comp.name] = backend.transformers_config(req)
    return mapping


def auto_quantization(
    settings: Any, model_id: str, source: str, device: str, dtype: Any
) -> tuple[Plan, dict[str, Any]]:
    """`QDS_QUANT_BACKEND=auto` for the loader: the plan for `settings` on `device`, and the
    per-component quant_mapping that loads it (each component with its own backend's config)."""
    from quantization.backends import ConfigRequest

    plan = plan_for_load(
        model_id,
        source,
        device,
        settings.memory_budget,
        settings.priority,
        settings.quality_floor_psnr,
        settings.compute_dtype,
    )
    mapping = quant_mapping(
        plan,
        lambda quant_type: ConfigRequest(
            quant_type=quant_type,
            compute_dtype=dtype,
            modules_to_not_convert=tuple(settings.modules_to_not_convert),
            bnb_double_quant=settings.bnb_double_quant,
            device=device,
        ),
    )
    return plan, mapping
