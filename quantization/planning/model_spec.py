"""A model as the planner sees it: its components' classes and parameter counts, read from a
diffusers folder's `model_index.json` and configs without its weights, and which measured
architecture it is."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from quantization.planning import tables
from quantization.planning.errors import PlanError

# Published component configs (no weights) that ship with the package: `qdserve plan --model
# flux-dev` plans for them on any machine.
PUBLISHED_CONFIGS = Path(__file__).parent.parent / "plan_configs"
PUBLISHED_MODELS = {
    tables.FLUX_DEV: ("black-forest-labs/FLUX.1-dev", PUBLISHED_CONFIGS / "flux-dev"),
    tables.SD3_MEDIUM: (
        "stabilityai/stable-diffusion-3-medium-diffusers",
        PUBLISHED_CONFIGS / "sd3-medium",
    ),
}
# The components that denoise (Flux, SD3: transformer; SD 1.x / SDXL: unet): the one list.
DENOISERS = ("transformer", "unet")

Role = Literal["denoiser", "text_encoder", "vae", "other"]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    library: str
    class_name: str
    parameters: int
    float_buffers: int  # elements of floating-point buffers (they move with the dtype too)
    linear_weights: int = 0  # elements of nn.Linear weights: what every backend quantizes
    other_buffer_bytes: int = 0  # integer buffers (position ids): their own dtype

    @property
    def role(self) -> Role:
        if self.name in DENOISERS:
            return "denoiser"
        if self.name.startswith("text_encoder"):
            return "text_encoder"
        if self.name == "vae":
            return "vae"
        return "other"

    def unquantized_bytes(self, dtype_bytes: int) -> int:
        return (self.parameters + self.float_buffers) * dtype_bytes + self.other_buffer_bytes


@dataclass(frozen=True)
class ModelSpec:
    model: str
    source: str
    pipeline_class: str
    components: tuple[ComponentSpec, ...]
    arch: str | None
    arch_note: str
    default_size: int

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)


@lru_cache(maxsize=64)
def _count(library: str, class_name: str, config_json: str) -> tuple[int, int, int, int]:
    """(parameters, float buffer elements, Linear weight elements, other buffer bytes)."""
    import torch
    from accelerate import init_empty_weights

    config = json.loads(config_json)
    module = __import__(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PlanError(f"{library} has no class {class_name!r} (model_index.json)")
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class.from_dict(config))
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if torch.is_floating_point(b))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = sum(
        b.numel() * b.element_size() for b in model.buffers() if not torch.is_floating_point(b)
    )
    return params, buffers, linear, other


def resolve_model_folder(model: str) -> tuple[str, Path]:
    """(display id, folder holding model_index.json) for a QDS_MODEL value or a published name."""
    if model in ("", "embedded"):
        raise PlanError(
            "the embedded model is the pipelines package's: pass its folder "
            "(pipelines.embedded.embedded_model_path()), as `qdserve plan` does"
        )
    if model in PUBLISHED_MODELS:
        return PUBLISHED_MODELS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), path
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, local_files_only=True, allow_patterns=["*.json"])
    except Exception as exc:
        raise PlanError(
            f"model {model!r} is neither a local diffusers folder nor in the HF cache ({exc}); "
            f"`qdserve plan` also knows {', '.join(PUBLISHED_MODELS)} (published configs)"
        ) from exc
    return model, Path(folder)


def read_model_spec(model: str, display: str | None = None) -> ModelSpec:
    """Component configs and parameter counts of a diffusers pipeline, without its weights."""
    model_id, folder = resolve_model_folder(model)
    model_id = display or model_id
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PlanError(f"{folder} has no model_index.json; point at a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    components = []
    for name, spec in sorted(index.items()):
        if not (
            isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")
        ):
            continue
        config_path = folder / name / "config.json"
        if not config_path.is_file():
            continue  # schedulers, tokenizers: no config.json with weights behind it
        library, class_name = spec
        counts = _count(library, class_name, config_path.read_text())
        components.append(ComponentSpec(name, library, class_name, *counts))
    if not any(c.role == "denoiser" for c in components):
        raise PlanError(f"{model_id}: no transformer or unet component to plan for")
    meta_path = folder / "qdserve.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    arch, note = identify_arch(components)
    return ModelSpec(
        model=model_id,
        source=str(folder),
        pipeline_class=str(index.get("_class_name", "?")),
        components=tuple(components),
        arch=arch,
        arch_note=note,
        # The loader's own fallback (pipelines/loader.py `_model_defaults`) is 1024 too.
        default_size=int(meta.get("default_size") or 1024),
    )


def identify_arch(components: Sequence[ComponentSpec]) -> tuple[str | None, str]:
    """Which measured architecture the denoiser is: same class, same parameter count."""
    den = next(c for c in components if c.role == "denoiser")
    for arch, (class_name, params, source) in tables.DENOISER_PARAMETERS.items():
        if den.class_name == class_name and den.parameters == params:
            return arch, f"{class_name} with {params:,} parameters = the {arch} runs ({source})"
    return None, (
        f"{den.class_name} with {den.parameters:,} parameters matches no measured denoiser: "
        "storage, speed and activation fall back to the most conservative measured values"
    )
