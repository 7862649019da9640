"""The plan: the combination of component options that fits the budget and ranks best for the
priority (quality, speed or memory), or NoPlanFits with the smallest plan's size; and for every
component, why it got its option and why each other option was left out."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantization.planning import tables
from quantization.planning.devices import Budget, DeviceSpec
from quantization.planning.errors import PlanError
from quantization.planning.model_spec import ComponentSpec, ModelSpec, Role
from quantization.planning.options import (
    Availability,
    Option,
    Rejected,
    activation_bytes,
    component_options,
    registry_availability,
)
from quantization.planning.units import human

PRIORITIES: tuple[str, ...] = ("quality", "speed", "memory")


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    role: Role
    library: str
    class_name: str
    parameters: int
    choice: Option
    reason: str
    alternatives: tuple[Rejected, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.choice.backend != "none"


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    device: DeviceSpec
    budget: Budget
    priority: str
    floor: float
    compute_dtype: str
    components: tuple[ComponentPlan, ...]
    weights_bytes: int
    activation_bytes: int
    activation_source: str
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def quant_choices(self) -> dict[str, tuple[str, str | None]]:
        """component -> (backend, quant type), quantized components only: what the loader maps."""
        return {
            c.name: (c.choice.backend, c.choice.quant_type) for c in self.components if c.quantized
        }


class NoPlanFits(PlanError):
    """Nothing fits the budget; `smallest` is the smallest plan there is."""

    def __init__(self, message: str, smallest_bytes: int) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


def _prune(options: list[Option]) -> list[Option]:
    """Drop options another option beats or ties on size, quality and speed at once."""
    kept = []
    for a in options:
        beaten = any(
            b is not a
            and b.bytes <= a.bytes
            and b.quality_key >= a.quality_key
            and b.seconds_key <= a.seconds_key
            and (
                (b.bytes, b.quality_key, b.seconds_key) != (a.bytes, a.quality_key, a.seconds_key)
                or b.order < a.order
            )
            for b in options
        )
        if not beaten:
            kept.append(a)
    return kept


def _resolve_dtype(compute_dtype: str, device: DeviceSpec) -> tuple[str, int]:
    if compute_dtype == "auto":
        return ("bfloat16", 2) if device.kind == "cuda" else ("float32", 4)
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if compute_dtype not in sizes:
        raise PlanError(f"compute dtype {compute_dtype!r}; allowed: auto, {', '.join(sizes)}")
    return compute_dtype, sizes[compute_dtype]


def _rank_key(
    priority: str, quality: tuple[Any, ...], seconds: float, total: int, order: tuple[int, ...]
) -> tuple[Any, ...]:
    """Larger is better. Quality is leximin: the worst component's expected quality first."""
    neg_order = tuple(-o for o in order)
    if priority == "speed":
        return (-seconds, quality, -total, neg_order)
    if priority == "memory":
        return (-total, quality, -seconds, neg_order)
    return (quality, -seconds, -total, neg_order)


def make_plan(
    spec: ModelSpec,
    device: DeviceSpec,
    budget: Budget,
    priority: str = "quality",
    floor: float = tables.DEFAULT_PSNR_FLOOR,
    compute_dtype: str = "auto",
    available: Availability = registry_availability,
) -> Plan:
    """The best plan that fits, or NoPlanFits naming the smallest plan's size."""
    if priority not in PRIORITIES:
        raise PlanError(f"QDS_PRIORITY={priority!r}; allowed: {', '.join(PRIORITIES)}")
    dtype_name, dtype_bytes = _resolve_dtype(compute_dtype, device)
    chosen_for = [c for c in spec.components if c.role in ("denoiser", "text_encoder")]
    fixed = [c for c in spec.components if c not in chosen_for]
    fixed_bytes = sum(c.unquantized_bytes(dtype_bytes) for c in fixed)

    all_options: dict[str, list[Option]] = {}
    refused: dict[str, list[Rejected]] = {}
    for comp in chosen_for:
        all_options[comp.name], refused[comp.name] = component_options(
            comp, spec.arch, device, dtype_name, dtype_bytes, floor, available
        )
    den_name = next(c.name for c in chosen_for if c.role == "denoiser")
    activation_cache: dict[tuple[str, str | None], tuple[int, str]] = {}

    def activation(den: Option) -> tuple[int, str]:
        key = (den.backend, den.quant_type)
        if key not in activation_cache:
            activation_cache[key] = activation_bytes(spec.arch, den, dtype_bytes)
        return activation_cache[key]

    def evaluate(choice: dict[str, Option]) -> tuple[int, tuple[Any, ...]]:
        den = choice[den_name]
        total = fixed_bytes + sum(o.bytes for o in choice.values()) + activation(den)[0]
        quality = tuple(sorted(o.quality_key for o in choice.values()))
        order = tuple(choice[c.name].order for c in chosen_for)
        return total, _rank_key(priority, quality, den.seconds_key, total, order)

    names = [c.name for c in chosen_for]
    pruned = [_prune(all_options[n]) for n in names]
    best: tuple[tuple[Any, ...], dict[str, Option]] | None = None
    smallest: tuple[int, dict[str, Option]] | None = None
    for combo in itertools.product(*pruned):
        choice = dict(zip(names, combo, strict=True))
        total, key = evaluate(choice)
        if smallest is None or total < smallest[0]:
            smallest = (total, choice)
        if total <= budget.bytes and (best is None or key > best[0]):
            best = (key, choice)
    assert smallest is not None
    if best is None:
        total, choice = smallest
        parts = ", ".join(f"{n}={o.label}" for n, o in choice.items())
        raise NoPlanFits(
            f"no plan for {spec.model} fits the memory budget {human(budget.bytes)} "
            f"({budget.source}) on {device.label}: the smallest plan ({parts}) needs "
            f"{human(total)} (weights {human(total - activation(choice[den_name])[0])} + "
            f"activation peak {human(activation(choice[den_name])[0])}). Raise "
            "QDS_MEMORY_BUDGET, use a larger device, or lower the quality floor",
            total,
        )

    _, choice = best
    total, _ = evaluate(choice)
    act, act_source = activation(choice[den_name])
    plans = []
    for comp in spec.components:
        if comp not in chosen_for:
            opt = Option(
                "none",
                None,
                comp.unquantized_bytes(dtype_bytes),
                f"{comp.parameters:,} parameters x {dtype_bytes} bytes",
                math.inf,
                None,
                True,
                "",
            )
            reason = (
                "kept unquantized: auto quantizes the denoiser and text encoders only "
                "(no measurement of a quantized " + comp.role + " exists here)"
            )
            plans.append(
                ComponentPlan(
                    comp.name,
                    comp.role,
                    comp.library,
                    comp.class_name,
                    comp.parameters,
                    opt,
                    reason,
                )
            )
            continue
        plans.append(
            _explain(
                comp,
                choice,
                all_options[comp.name],
                refused[comp.name],
                evaluate,
                budget,
                priority,
            )
        )
    notes = [
        "expected quality: PSNR and adherence of the demo model (docs/quality.md, CPU, denoiser "
        "quantized alone); text encoders are ranked with the same numbers, unmeasured for them",
    ]
    if device.kind == "cuda":
        notes.append(
            "GPU speed: seconds per denoiser step on an H200 (docs/benchmarks/gpu.md); text "
            "encoder speed is not measured and does not enter the ranking"
        )
    return Plan(
        model=spec,
        device=device,
        budget=budget,
        priority=priority,
        floor=floor,
        compute_dtype=dtype_name,
        components=tuple(plans),
        weights_bytes=total - act,
        activation_bytes=act,
        activation_source=act_source,
        notes=tuple(notes),
    )


def _explain(
    comp: ComponentSpec,
    choice: dict[str, Option],
    options: list[Option],
    refused: list[Rejected],
    evaluate: Callable[[dict[str, Option]], tuple[int, tuple[Any, ...]]],
    budget: Budget,
    priority: str,
) -> ComponentPlan:
    """Why this component got its option: every other option swapped into the chosen plan."""
    chosen = choice[comp.name]
    alternatives: list[Rejected] = []
    displaced_by_budget = False
    for other in options:
        if other is chosen:
            continue
        total, _ = evaluate({**choice, comp.name: other})
        if total > budget.bytes:
            if other.quality_key > chosen.quality_key:
                displaced_by_budget = True
            alternatives.append(
                Rejected(
                    other.label,
                    f"{human(other.bytes)}: the plan would need {human(total)} > budget "
                    f"{human(budget.bytes)}",
                )
            )
        else:
            alternatives.append(Rejected(other.label, _ranks_lower(chosen, other, priority)))
    alternatives += refused
    speed = f"; speed {chosen.speed_source}" if chosen.speed_source else ""
    if chosen.backend == "none":
        head = "unquantized: the plan fits with it, and nothing beats unquantized on quality"
        if priority != "quality":
            head = f"unquantized: ranks first for priority {priority} among plans that fit"
    else:
        why = {
            "quality": "the best expected quality with which the whole plan fits the budget"
            if displaced_by_budget
            else "ranks first on quality, then speed, among the options that fit",
            "speed": "the fastest measured denoiser option that fits, then quality",
            "memory": "the smallest option above the quality floor, then quality",
        }[priority]
        head = f"{chosen.label}: {why}"
    size = f"size {human(chosen.bytes)} ({chosen.bytes_source})"
    reason = f"{head}. {size}; quality {chosen.quality_text()}{speed}"
    return ComponentPlan(
        comp.name,
        comp.role,
        comp.library,
        comp.class_name,
        comp.parameters,
        chosen,
        reason,
        tuple(alternatives),
    )


def _ranks_lower(chosen: Option, other: Option, priority: str) -> str:
    def quality(o: Option) -> str:
        return (
            "unquantized"
            if o.backend == "none"
            else (f"{o.psnr:.1f} dB {'measured' if o.quality_measured else 'unmeasured'}")
        )

    def speed(o: Option) -> str:
        return "unmeasured" if o.seconds is None else f"{o.seconds:.4f} s"

    q = f"quality {quality(other)} vs {quality(chosen)}"
    s = f"speed {speed(other)} vs {speed(chosen)}"
    m = f"size {human(other.bytes)} vs {human(chosen.bytes)}"
    if other.quality_key < chosen.quality_key:
        if priority == "quality":
            return f"fits, lower expected quality: {q}"
        return f"fits, ranks lower: {q}" + (
            f"; {s}" if other.seconds_key != chosen.seconds_key else ""
        )
    if other.quality_key == chosen.quality_key:
        if other.seconds_key > chosen.seconds_key:
            return f"fits, same expected quality, slower: {s}"
        if other.bytes > chosen.bytes:
            return f"fits, same expected quality, larger: {m}"
        if other.seconds_key == chosen.seconds_key and other.bytes == chosen.bytes:
            return "fits, ties on every ranking key; the earlier backend in the registry was kept"
    if priority == "speed" and other.seconds_key > chosen.seconds_key:
        return f"fits, slower: {s}"
    if priority == "memory" and other.bytes > chosen.bytes:
        return f"fits, larger: {m}"
    # Better on this component alone, but the whole plan ranks lower (leximin quality: another
    # component's worse option is the plan's weakest link, or the plan is slower overall).
    return f"fits, but the whole plan then ranks lower ({q}; {s}; {m})"
