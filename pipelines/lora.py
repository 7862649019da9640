"""LoRA adapters declared by the operator (`QDS_LORAS`), loaded once, chosen per request.

Start-up (`load_adapters`), for each declared adapter:

1. the backend strategy says whether diffusers/PEFT can put a LoRA on its quantized base
   (`QuantBackend.lora_unsupported_reason`, filled from the measured matrix,
   docs/benchmarks/lora.md); if not, start-up stops with the backend and the reason;
2. diffusers' own `load_lora_weights` reads the file (diffusers, kohya and PEFT formats, local
   path or hub repo id) and PEFT injects it, so every format is interpreted exactly as diffusers
   would; its effective weights are read back from the PEFT layers (A, and B times PEFT's
   scaling) and the named adapter is deleted again.

Then one PEFT adapter, the *slot*, is added on the union of the modules the adapters target,
with a fixed rank (the sum of the declared ranks, so any set of declared adapters fits) and
tensor scalings (`peft.utils.hotswap.prepare_model_for_compiled_hotswap`, what diffusers'
`enable_lora_hotswap` sets up). A request's adapter set and scales are one LoRA: the chosen
adapters' A matrices stacked, their B matrices scaled and stacked (sum of B_i s_i A_i x). Switching
sets copies that into the slot in place (PEFT's `hotswap_adapter_from_state_dict`): no base
reload, no new parameters, the same tensor shapes, so a compiled denoiser does not recompile.
A request without adapters runs with the slot's layers disabled, which PEFT implements as the
base layer's own forward: the base output is bit-exact.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantization.planning.model_spec import DENOISERS

if TYPE_CHECKING:
    import torch

    from pipelines.loader import LoadedPipeline

log = logging.getLogger("qdserve.lora")

SLOT = "qds_slot"
# Adapter names appear in URLs, metrics labels and logs: keep them short and plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Adapters shipped with the package (the demo LoRA for the embedded model): `QDS_LORAS=orange`.
SHIPPED_DIR = Path(__file__).parent / "demo_weights" / "lora"
# The scale range a request may ask for: enough to amplify or invert an adapter, bounded so a
# typo (100 instead of 1.0) is a 400, not noise.
MIN_SCALE = -4.0
MAX_SCALE = 4.0
DEFAULT_SCALE = 1.0

Selection = tuple[tuple[str, float], ...]


class LoraError(RuntimeError):
    """An adapter cannot be declared, loaded or applied; the message says what to change."""


class LoraUnsupported(LoraError):
    """QDS_LORAS on a backend that cannot take a LoRA: a configuration refusal whose message
    is this package's own text (no paths), so /readyz may show it."""


@dataclass(frozen=True)
class LoraSpec:
    """One `QDS_LORAS` entry: `name=source`, where source is a .safetensors file, a folder,
    or a hub repo id (optionally `repo/id:weight_name.safetensors`); a bare `name` is the
    package's shipped adapter of that name."""

    name: str
    source: str
    weight_name: str | None = None

    def describe_source(self) -> str:
        return f"{self.source}:{self.weight_name}" if self.weight_name else self.source


def parse_loras(text: str | None) -> list[LoraSpec]:
    """`QDS_LORAS` -> specs; raises ValueError naming the bad entry."""
    specs: list[LoraSpec] = []
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, source = (part.strip() for part in entry.partition("="))
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"QDS_LORAS entry {entry!r}: the name must match {NAME_PATTERN.pattern} "
                "(letters, digits, _ . -, up to 64)"
            )
        if any(s.name == name for s in specs):
            raise ValueError(f"QDS_LORAS declares {name!r} twice")
        if not sep:
            shipped = SHIPPED_DIR / f"{name}.safetensors"
            if not shipped.is_file():
                known = sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))
                raise ValueError(
                    f"QDS_LORAS entry {name!r} has no source and no shipped adapter has that "
                    f"name (shipped: {', '.join(known) or 'none'}); write {name}=<path or repo id>"
                )
            specs.append(LoraSpec(name, str(shipped)))
            continue
        if not source:
            raise ValueError(f"QDS_LORAS entry {entry!r}: empty source after '='")
        weight_name = None
        if not Path(source).exists() and ":" in source:
            source, _, weight_name = source.partition(":")
        specs.append(LoraSpec(name, source, weight_name or None))
    return specs


def normalize_selection(items: list[tuple[str, float]] | Selection) -> Selection:
    """A request's adapters as the batching key sees them: sorted by name, scale-0 entries
    dropped (they change nothing, so such a request is a base request)."""
    return tuple(sorted((n, float(s)) for n, s in items if float(s) != 0.0))


@dataclass
class Adapter:
    spec: LoraSpec
    rank: int
    # (component, module path) -> (A, B * PEFT's scaling): the adapter's effective delta.
    weights: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
    load_seconds: float

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "source": self.spec.describe_source(),
            "rank": self.rank,
            "modules": len(self.weights),
            "components": sorted({c for c, _ in self.weights}),
            "bytes": self.nbytes,
            "load_seconds": round(self.load_seconds, 3),
        }


@dataclass
class LoraAdapters:
    """The declared adapters of one loaded pipeline and its slot; `activate` per batch."""

    pipeline: Any
    adapters: dict[str, Adapter]
    rank: int  # the slot's rank
    # component -> module path -> the slot's PEFT LoRA layer
    slot_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    active: Selection = ()
    switches: int = 0
    last_switch_seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def slot_bytes(self) -> int:
        total = 0
        for layers in self.slot_layers.values():
            for layer in layers.values():
                total += layer.lora_A[SLOT].weight.nbytes + layer.lora_B[SLOT].weight.nbytes
        return total

    @property
    def nbytes(self) -> int:
        """Memory the adapters add to the model: their weights plus the slot."""
        return sum(a.nbytes for a in self.adapters.values()) + self.slot_bytes

    def describe(self) -> list[dict[str, Any]]:
        active = dict(self.active)
        return [
            {**a.describe(), "state": "active" if name in active else "loaded"}
            for name, a in self.adapters.items()
        ]

    def check(self, selection: Selection) -> None:
        unknown = [n for n, _ in selection if n not in self.adapters]
        if unknown:
            raise LoraError(
                f"unknown LoRA adapter(s) {', '.join(map(repr, unknown))}; declared: "
                f"{', '.join(self.adapters) or 'none (set QDS_LORAS)'}"
            )

    def activate(self, selection: Selection) -> bool:
        """Make `selection` the adapters the next forward uses; True when that changed them."""
        selection = normalize_selection(selection)
        if selection == self.active:
            return False
        self.check(selection)
        start = time.perf_counter()
        if selection:
            self._swap_in(selection)
        if bool(selection) != bool(self.active):
            self._enable(bool(selection))
        self.active = selection
        self.switches += 1
        self.last_switch_seconds = time.perf_counter() - start
        return True

    def _enable(self, on: bool) -> None:
        for layers in self.slot_layers.values():
            for layer in layers.values():
                layer.enable_adapters(on)

    def _swap_in(self, selection: Selection) -> None:
        """Write the selection's stacked A and scaled B into the slot, zero-padded, in place.

        Hand-written rather than PEFT's `hotswap_adapter_from_state_dict` (which does the same
        copy): that one walks every module and the whole state dict on each call, 30-50 ms per
        switch on the demo model here and more the larger the model, where this is a few
        slice copies per targeted module.
        """
        import torch

        with torch.no_grad():
            for component, layers in self.slot_layers.items():
                for path, layer in layers.items():
                    slot_a = layer.lora_A[SLOT].weight
                    slot_b = layer.lora_B[SLOT].weight
                    offset = 0
                    for name, scale in selection:
                        pair = self.adapters[name].weights.get((component, path))
                        if pair is None:
                            continue
                        a, b = pair
                        r = a.shape[0]
                        slot_a[offset : offset + r].copy_(a)
                        slot_b[:, offset : offset + r].copy_(b).mul_(scale)
                        offset += r
                    slot_a[offset:].zero_()
                    slot_b[:, offset:].zero_()


def _lora_layers(module: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def _extract(pipe: Any, name: str) -> dict[tuple[str, str], tuple[Any, Any]]:
    """The effective weights of adapter `name` from the PEFT layers diffusers injected."""
    weights: dict[tuple[str, str], tuple[Any, Any]] = {}
    for component in getattr(pipe, "_lora_loadable_modules", ()):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for path, layer in _lora_layers(module).items():
            if name not in layer.lora_A:
                continue
            if getattr(layer, "use_dora", {}).get(name):
                raise LoraError(f"{path}: DoRA adapters cannot share the hot-swap slot")
            if getattr(layer.lora_B[name], "bias", None) is not None:
                raise LoraError(f"{path}: LoRA with a bias (lora_bias) is not supported")
            a = layer.lora_A[name].weight.detach().clone()
            b = layer.lora_B[name].weight.detach() * float(layer.scaling[name])
            weights[(component, path)] = (a, b.clone())
    return weights


def _load_one(pipe: Any, spec: LoraSpec) -> Adapter:
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"adapter_name": spec.name}
    if spec.weight_name:
        kwargs["weight_name"] = spec.weight_name
    try:
        pipe.load_lora_weights(spec.source, **kwargs)
    except Exception as exc:
        raise LoraError(
            f"QDS_LORAS {spec.name}={spec.describe_source()}: diffusers could not load it: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        weights = _extract(pipe, spec.name)
    finally:
        pipe.delete_adapters(spec.name)
    if not weights:
        raise LoraError(
            f"QDS_LORAS {spec.name}={spec.describe_source()}: no LoRA layer of this pipeline "
            "matched the file (is it for another model family?)"
        )
    # The components adapters may touch: the denoiser (Flux, SD3: transformer; SDXL: unet).
    others = sorted({c for c, _ in weights} - set(DENOISERS))
    if others:
        # Prompt embeddings are computed when a request joins a step batch and cached across
        # requests (pipelines.prompt_cache), keyed without the adapter set: adapters on the
        # text encoders would be applied to the wrong requests' prompts.
        raise LoraError(
            f"QDS_LORAS {spec.name}={spec.describe_source()}: it has LoRA layers for "
            f"{', '.join(others)}; qdserve applies adapters to the denoiser only (prompt "
            "embeddings are shared between requests); use a file without text-encoder layers"
        )
    rank = max(a.shape[0] for a, _ in weights.values())
    return Adapter(spec, rank, weights, time.perf_counter() - start)


def _add_slot(pipe: Any, adapters: dict[str, Adapter], rank: int) -> dict[str, dict[str, Any]]:
    """One PEFT adapter on the union of the targeted modules, zero, disabled, hot-swappable."""
    from peft import LoraConfig
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    targets: dict[str, set[str]] = {}
    for adapter in adapters.values():
        for component, path in adapter.weights:
            targets.setdefault(component, set()).add(path)
    slots: dict[str, dict[str, Any]] = {}
    for component, paths in targets.items():
        module = getattr(pipe, component)
        # A full-match regex, not a name list: PEFT matches list entries by suffix, which
        # would also catch e.g. every block's `proj_out` for the top-level `proj_out`.
        pattern = "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern, lora_dropout=0.0)
        module.add_adapter(config, adapter_name=SLOT)
        prepare_model_for_compiled_hotswap(module, check_compiled="ignore")
        layers = {p: m for p, m in _lora_layers(module).items() if SLOT in m.lora_A}
        for layer in layers.values():
            layer.lora_A[SLOT].weight.data.zero_()
            layer.lora_B[SLOT].weight.data.zero_()
            layer.set_adapter(SLOT)
            layer.enable_adapters(False)
        slots[component] = layers
    return slots


def load_adapters(loaded: LoadedPipeline, specs: list[LoraSpec]) -> LoraAdapters | None:
    """Load the declared adapters into `loaded` (stored in `loaded.extra["lora"]`), or raise
    LoraError naming the backend and the reason when its quantized base cannot take them."""
    if not specs:
        return None
    refuse_unsupported(loaded)
    pipe = loaded.pipeline
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(
            f"QDS_LORAS is set but {type(pipe).__name__} has no LoRA loader in diffusers"
        )
    try:
        adapters = {spec.name: _load_one(pipe, spec) for spec in specs}
    except LoraError as exc:
        # Name the backend: an unmeasured one (a GPU backend on a CPU-only test machine)
        # fails here, in diffusers, rather than in `refuse_unsupported`.
        what = f"{loaded.backend} {loaded.quant_type}" if loaded.quant_type else loaded.backend
        raise LoraError(f"{exc} (backend {what})") from exc
    rank = sum(a.rank for a in adapters.values())
    lora = LoraAdapters(pipe, adapters, rank, _add_slot(pipe, adapters, rank))
    loaded.extra["lora"] = lora
    log.info(
        "LoRA adapters %s loaded (slot rank %d, %.2f MB)",
        ", ".join(adapters),
        rank,
        lora.nbytes / 1e6,
    )
    return lora


def attach(loaded: LoadedPipeline, specs: list[LoraSpec], *, required: bool) -> None:
    """Load `specs` into a freshly loaded pipeline (before it is compiled).

    `required` (the default model): a backend that cannot take them stops the load, so the
    server never runs the default model without the adapters it was told to serve. Otherwise
    (preloaded or on-demand variants) the variant loads without adapters and
    `loaded.extra["lora_error"]` says why; requests asking it for adapters get that reason.
    """
    if not specs:
        return
    try:
        lora = load_adapters(loaded, specs)
    except LoraError as exc:
        if required:
            raise
        loaded.extra["lora_error"] = str(exc)
        log.warning("%s", exc)
        return
    if lora is not None:
        from pipelines.loader import ComponentInfo

        # Counted like a component, so the cache's memory budget, /v1/models and
        # qds_model_memory_bytes{component="lora"} include the adapters and the slot.
        params = sum(
            a.numel() + b.numel() for ad in lora.adapters.values() for a, b in ad.weights.values()
        )
        loaded.components["lora"] = ComponentInfo(
            name="lora",
            quantized=False,
            storage_bytes=lora.nbytes,
            parameters=params,
            unquantized_bytes=lora.nbytes,
            bf16_bytes=params * 2,
        )


def check_declared(loras: str, backend: str, quant_type: str | None) -> None:
    """Start-up check before anything loads: QDS_LORAS on a backend that cannot take a LoRA
    is refused with the backend and the reason (like `qdserve backends` for hardware)."""
    from quantization.backends import BACKENDS

    if not parse_loras(loras) or backend not in BACKENDS:
        return  # nothing declared, or "auto": checked per component once the plan is made
    if reason := BACKENDS[backend].lora_unsupported_reason(quant_type):
        what = f"{backend} {quant_type}" if quant_type else backend
        raise LoraUnsupported(f"QDS_LORAS is set but backend {what} cannot take a LoRA: {reason}")


def refuse_unsupported(loaded: LoadedPipeline) -> None:
    """Raise LoraError when a backend of `loaded`'s quantized components cannot take a LoRA."""
    from quantization.backends import get_backend

    variants = {(loaded.backend, loaded.quant_type)}
    plan = loaded.extra.get("plan") or {}
    for choice in plan.get("components", {}).values() if isinstance(plan, dict) else ():
        if isinstance(choice, dict) and choice.get("backend"):
            variants.add((choice["backend"], choice.get("quant_type")))
    for key, qtype in sorted(variants, key=str):
        try:
            backend = get_backend(key)
        except (KeyError, ValueError):
            continue  # "auto" itself: its components were added from the plan above
        if reason := backend.lora_unsupported_reason(qtype):
            what = f"{key} {qtype}" if qtype else key
            raise LoraUnsupported(
                f"QDS_LORAS is set but backend {what} cannot take a LoRA: {reason}"
            )


def slot_active(loaded: LoadedPipeline) -> bool:
    """An adapter is enabled in the hot-swap slot now (a compiled graph's guards see it)."""
    adapters = adapters_of(loaded)
    return bool(adapters is not None and adapters.active)


def adapters_of(loaded: LoadedPipeline) -> LoraAdapters | None:
    """The adapters loaded into `loaded` (duck-typed: engine tests use stand-ins)."""
    lora = getattr(loaded, "extra", {}).get("lora")
    return lora if hasattr(lora, "activate") else None


def activate(loaded: LoadedPipeline, selection: Selection) -> None:
    """Before a forward of `loaded`: make `selection` (may be empty) the active adapters."""
    lora = adapters_of(loaded)
    if lora is None:
        if selection:
            raise LoraError("this model has no LoRA adapters loaded (set QDS_LORAS)")
        return
    lora.activate(selection)


def label(selection: Selection) -> str:
    """A bounded metrics label for an adapter set: "none", the one adapter's declared name
    (requests only name declared adapters), or "multiple"."""
    if not selection:
        return "none"
    return selection[0][0] if len(selection) == 1 else "multiple"


def adapter_bytes(loaded: LoadedPipeline) -> int:
    lora = adapters_of(loaded)
    return lora.nbytes if lora is not None else 0
