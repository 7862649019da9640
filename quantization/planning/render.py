"""A plan shown: the text `qdserve plan` prints, the JSON form (`qdserve plan --json`, the
loaded model's `extra["plan"]`), the one-line summary the loader logs, and the short card
`GET /v1/models` shows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from quantization.planning.search import Plan
from quantization.planning.units import human


def plan_summary(plan: Plan) -> str:
    """`COMPONENT=CHOICE, ...; TOTAL of BUDGET` (denoiser and text encoders): the loader logs it."""
    parts = [
        f"{c.name}={c.choice.label}"
        for c in plan.components
        if c.role in ("denoiser", "text_encoder")
    ]
    return f"{', '.join(parts)}; {human(plan.total_bytes)} of {human(plan.budget.bytes)}"


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The whole plan as JSON-ready data."""
    return {
        "model": plan.model.model,
        "architecture": plan.model.arch,
        "architecture_note": plan.model.arch_note,
        "device": {
            "kind": plan.device.kind,
            "name": plan.device.name,
            "capability": ".".join(map(str, plan.device.capability))
            if plan.device.capability
            else None,
            "total_bytes": plan.device.total_bytes,
            "described": plan.device.described,
        },
        "budget_bytes": plan.budget.bytes,
        "budget_source": plan.budget.source,
        "priority": plan.priority,
        "quality_floor_psnr_db": plan.floor,
        "compute_dtype": plan.compute_dtype,
        "weights_bytes": plan.weights_bytes,
        "activation_bytes": plan.activation_bytes,
        "activation_source": plan.activation_source,
        "total_bytes": plan.total_bytes,
        "components": {
            c.name: {
                "role": c.role,
                "class": c.class_name,
                "parameters": c.parameters,
                "backend": c.choice.backend,
                "quant_type": c.choice.quant_type,
                "bytes": c.choice.bytes,
                "bytes_source": c.choice.bytes_source,
                "expected_psnr_db": None if math.isinf(c.choice.psnr) else c.choice.psnr,
                "expected_adherence": c.choice.adherence,
                "quality_measured": c.choice.quality_measured,
                "quality_source": c.choice.quality_source,
                "seconds": c.choice.seconds,
                "speed_source": c.choice.speed_source,
                "reason": c.reason,
                "rejected": [{"option": r.option, "reason": r.reason} for r in c.alternatives],
            }
            for c in plan.components
        },
        "notes": list(plan.notes),
    }


def plan_text(plan: Plan) -> str:
    """The whole plan for people: each choice with its reason, each alternative left out."""
    m = plan.model
    lines = [
        f"model:    {m.model} ({m.pipeline_class}); {m.arch_note}",
        f"device:   {plan.device.label}; compute dtype {plan.compute_dtype}",
        f"budget:   {human(plan.budget.bytes)} ({plan.budget.source})",
        f"priority: {plan.priority}; quality floor {plan.floor:.1f} dB PSNR",
        f"plan:     {human(plan.total_bytes)} = weights {human(plan.weights_bytes)} + "
        f"activation peak {human(plan.activation_bytes)} at {m.default_size}x{m.default_size}",
        f"          activation: {plan.activation_source}",
        "",
    ]
    for c in plan.components:
        lines.append(
            f"{c.name} ({c.class_name}, {c.parameters:,} parameters): {c.choice.label}, "
            f"{human(c.choice.bytes)}"
        )
        lines.append(f"    why: {c.reason}")
        for r in c.alternatives:
            lines.append(f"    - not {r.option}: {r.reason}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_card(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a plan (`plan_dict`) that `GET /v1/models` shows."""
    return {
        "priority": plan["priority"],
        "budget_bytes": plan["budget_bytes"],
        "total_bytes": plan["total_bytes"],
        "activation_bytes": plan["activation_bytes"],
        "components": {
            name: {k: c[k] for k in ("backend", "quant_type", "bytes")}
            for name, c in plan["components"].items()
        },
    }
