"""Build a diffusers pipeline with the configured quantization applied.

settings -> backend strategy -> diffusers / transformers configs (quant_mapping) -> pipeline,
placed on its device, with a report of what was loaded and what it really occupies.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.embedded import EMBEDDED_MODEL_ID, T5_MAX_LENGTH, embedded_model_path
from quantization.backends import (
    BACKENDS,
    BackendUnavailable,
    ConfigRequest,
    ModelLoadError,
    backend_for_saved,
    get_backend,
)
from quantization.environment import DeviceInfo, detect_device, resolve_device
from quantization.planning.model_spec import DENOISERS
from quantization.settings import AUTO_BACKEND, OffloadMode, QuantSettings
from quantization.storage import module_storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qdserve.loader")

QDSERVE_META = "qdserve.json"


@dataclass(frozen=True)
class ModelDefaults:
    size: int
    steps: int
    guidance: float
    size_multiple: int
    max_sequence_length: int | None = None


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    quantized: bool
    storage_bytes: int
    parameters: int
    unquantized_bytes: int  # the same parameters in the compute dtype
    bf16_bytes: int


@dataclass
class LoadedPipeline:
    pipeline: Any
    model: str
    model_path: str
    backend: str
    quant_type: str | None
    compute_dtype: torch.dtype
    device: str
    offload: str
    components: dict[str, ComponentInfo]
    load_seconds: float
    pre_quantized: bool
    defaults: ModelDefaults
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_bytes(self) -> int:
        return sum(c.storage_bytes for c in self.components.values())

    @property
    def quantized_storage_bytes(self) -> int:
        return sum(c.storage_bytes for c in self.components.values() if c.quantized)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "quant_type": self.quant_type,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "device": self.device,
            "offload": self.offload,
            "pre_quantized": self.pre_quantized,
            "load_seconds": round(self.load_seconds, 3),
            "storage_bytes": self.storage_bytes,
            **{k: self.extra[k] for k in ("plan", "quality") if k in self.extra},
            "components": {
                name: {
                    "quantized": c.quantized,
                    "storage_bytes": c.storage_bytes,
                    "parameters": c.parameters,
                    "unquantized_bytes": c.unquantized_bytes,
                }
                for name, c in self.components.items()
            },
        }

    def release(self) -> None:
        """Drop the pipeline's tensors so an evicted entry really frees its memory."""
        pipe, self.pipeline = self.pipeline, None
        if pipe is not None:
            for name in list(getattr(pipe, "components", {})):
                setattr(pipe, name, None)
        del pipe
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def resolve_model(settings: QuantSettings) -> tuple[str, str]:
    """(display id, path or hub id to load from)."""
    if settings.model in ("embedded", EMBEDDED_MODEL_ID, ""):
        return EMBEDDED_MODEL_ID, str(embedded_model_path(settings.cache_dir))
    path = Path(settings.model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"QDS_MODEL={settings.model!r} is a folder without model_index.json; "
                "point it at a diffusers pipeline folder (save_pretrained output)"
            )
        return str(path), str(path)
    return settings.model, settings.model


def prepare(settings: QuantSettings, work_dir: Path) -> QuantSettings:
    """The backend's offline artifacts (a .gguf file) for the configured model, made in
    `work_dir`: settings that load them (`QuantBackend.prepare` with the model's folder)."""
    _model_id, source = resolve_model(settings)
    return get_backend(settings.quant_backend).prepare(settings, Path(work_dir), source)


def _model_index(source: str) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source))
    except Exception as exc:
        raise ModelLoadError(
            f"QDS_MODEL={source!r}: cannot read its model_index.json ({exc}). Use a local "
            "diffusers folder, a hub id already in the HF cache, or `embedded`"
        ) from exc


def _component_libraries(index: dict[str, Any]) -> dict[str, str]:
    return {
        name: spec[0]
        for name, spec in index.items()
        if isinstance(spec, list | tuple) and len(spec) == 2 and spec[0] is not None
    }


@dataclass(frozen=True)
class SavedQuantization:
    """How a pre-quantized folder was quantized: by qdserve (qdserve.json) or plain diffusers."""

    backend: str  # a registry key
    quant_type: str | None
    components: tuple[str, ...]  # the components saved quantized


def _saved_config(path: Path, component: str) -> dict[str, Any] | None:
    config = path / component / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc else None


def saved_quantization(source: str, components: dict[str, str]) -> SavedQuantization | None:
    """How the folder at `source` is already quantized, or None for an unquantized model.

    Reads qdserve's own metadata when present, else each component's saved
    `quantization_config`, whose `quant_method` the backends recognise (diffusers and
    transformers write it on `save_pretrained`). Reads only JSON: no GPU, no library.
    """
    path = Path(source)
    if not path.is_dir():
        return None
    saved = {name: qc for name in components if (qc := _saved_config(path, name)) is not None}
    meta = path / QDSERVE_META
    if meta.is_file():
        data = json.loads(meta.read_text())
        if data.get("backend"):
            if data["backend"] not in BACKENDS:
                raise ModelLoadError(
                    f"QDS_MODEL={source!r} was saved with backend {data['backend']!r}, which "
                    f"this qdserve does not have; backends: {', '.join(BACKENDS)}"
                )
            names = data.get("components_quantized") or list(saved)
            return SavedQuantization(data["backend"], data.get("quant_type"), tuple(names))
    if not saved:
        return None
    name, config = next(iter(saved.items()))
    method = str(config.get("quant_method"))
    backend = backend_for_saved(method, config)
    if backend is None:
        raise ModelLoadError(
            f"QDS_MODEL={source!r}: component {name!r} is quantized with {method!r}, which no "
            f"qdserve backend reads; backends: {', '.join(BACKENDS)}"
        )
    return SavedQuantization(backend.key, backend.saved_quant_type(config), tuple(saved))


def _model_defaults(pipe: Any, source: str, denoiser: str) -> ModelDefaults:
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    multiple = vae_scale * (2 if denoiser == "transformer" else 1)
    meta_path = Path(source) / QDSERVE_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    default_sample = getattr(pipe, "default_sample_size", None)
    if meta.get("embedded"):
        meta = {"default_size": 32, "default_steps": 4, **meta}
    size = int(meta.get("default_size") or (default_sample * vae_scale if default_sample else 1024))
    seq = T5_MAX_LENGTH if meta.get("embedded") or meta.get("default_size") else None
    return ModelDefaults(
        size=size,
        steps=int(meta.get("default_steps") or (4 if meta.get("embedded") else 28)),
        guidance=float(meta.get("default_guidance") or 3.5),
        size_multiple=multiple,
        max_sequence_length=seq,
    )


def plan_quantization(
    settings: QuantSettings,
    libraries: dict[str, str],
    denoiser: str,
    dtype: torch.dtype,
    skip: frozenset[str] = frozenset(),
    device: str | None = None,
) -> dict[str, Any]:
    """component -> quantization config object (diffusers' or transformers' class)."""
    backend = get_backend(settings.quant_backend)
    if not backend.quantizes:
        return {}
    req = ConfigRequest(
        quant_type=settings.resolved_quant_type,
        compute_dtype=dtype,
        modules_to_not_convert=tuple(settings.modules_to_not_convert),
        bnb_double_quant=settings.bnb_double_quant,
        device=device,
    )
    mapping: dict[str, Any] = {}
    for wanted in settings.components_to_quantize:
        name = denoiser if wanted == "denoiser" else wanted
        if name not in libraries:
            raise ModelLoadError(
                f"QDS_COMPONENTS_TO_QUANTIZE names {wanted!r}, which this model does not have; "
                f"its components: {', '.join(sorted(libraries))}"
            )
        if name in skip:
            continue
        library = libraries[name]
        if library == "diffusers":
            mapping[name] = backend.diffusers_config(req)
        elif library == "transformers":
            mapping[name] = backend.transformers_config(req)
        else:
            raise ModelLoadError(f"component {name!r} comes from {library}; cannot quantize it")
    return mapping


def _place(pipe: Any, device: str, offload: OffloadMode) -> None:
    if offload is OffloadMode.none:
        pipe.to(device)
        return
    if not device.startswith("cuda"):
        raise ModelLoadError(
            f"QDS_OFFLOAD={offload.value} moves weights between CPU and a GPU; "
            "it needs QDS_DEVICE=cuda. Use QDS_OFFLOAD=none on CPU"
        )
    if offload is OffloadMode.model:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def load_pipeline(settings: QuantSettings) -> LoadedPipeline:
    """Load and quantize the configured pipeline; raise BackendUnavailable / ModelLoadError."""
    start = time.perf_counter()
    device = resolve_device(settings.device)
    device_info = detect_device()
    if device.startswith("cuda") and not device_info.cuda:
        raise BackendUnavailable("QDS_DEVICE=cuda but no CUDA GPU is visible; use QDS_DEVICE=cpu")
    # The hardware the model will run on: a CUDA machine asked to use the CPU checks as CPU.
    target = device_info if device.startswith("cuda") else DeviceInfo(False, "cpu")
    auto = settings.quant_backend == AUTO_BACKEND  # the plan checks each component's backend
    backend = get_backend("none" if auto else settings.quant_backend)
    quant_type = settings.resolved_quant_type
    backend.check(quant_type, target, settings.compute_dtype)
    dtype = resolve_dtype(settings.compute_dtype, device)

    model_id, source = resolve_model(settings)
    index = _model_index(source)
    libraries = _component_libraries(index)
    denoiser = next((d for d in DENOISERS if d in libraries), None)
    if denoiser is None:
        raise ModelLoadError(f"{model_id}: no transformer or unet component to quantize")

    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    saved = saved_quantization(source, libraries)
    pre_quantized = saved is not None
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    quantized_names: set[str] = set()
    extra: dict[str, Any] = {}
    if saved is not None:
        if backend.quantizes and saved.backend != backend.key:
            raise ModelLoadError(
                f"QDS_MODEL={settings.model!r} is already quantized with {saved.backend}; "
                f"unset QDS_QUANT_BACKEND or set it to {saved.backend}"
            )
        backend = get_backend(saved.backend)
        backend.before_loading_saved(device)
        quant_type = saved.quant_type or (
            quant_type if settings.quant_backend == saved.backend else None
        )
        backend.check(quant_type, target, None)
        quantized_names = set(saved.components)
    elif auto:
        from quantization.planning.entry import auto_quantization
        from quantization.planning.errors import PlanError
        from quantization.planning.render import plan_dict, plan_summary

        try:
            plan, mapping = auto_quantization(settings, model_id, source, device, dtype)
        except PlanError as exc:
            raise ModelLoadError(f"QDS_QUANT_BACKEND=auto: {exc}") from exc
        log.info("auto plan for %s: %s", model_id, plan_summary(plan))
        if mapping:
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        quantized_names = set(mapping)
        extra["plan"] = plan_dict(plan)
    else:
        model = backend.load_denoiser(settings, source, index[denoiser][1], denoiser, dtype)
        if model is not None:
            kwargs[denoiser] = model
            quantized_names.add(denoiser)
        skip = frozenset(quantized_names)
        mapping = plan_quantization(settings, libraries, denoiser, dtype, skip, device)
        if mapping:
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        quantized_names |= set(mapping)

    log.info("loading %s with %s %s on %s", model_id, backend.key, quant_type or "", device)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (BackendUnavailable, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"loading {model_id} with {backend.key} failed: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    _place(pipe, device, settings.offload)

    components = {}
    for name in libraries:
        module = getattr(pipe, name, None)
        if module is None or not hasattr(module, "parameters"):
            continue
        report = module_storage(module)
        components[name] = ComponentInfo(
            name=name,
            quantized=name in quantized_names,
            storage_bytes=report.storage_bytes,
            parameters=report.parameters,
            unquantized_bytes=report.unquantized_bytes(dtype),
            bf16_bytes=report.parameters * 2,
        )
    loaded = LoadedPipeline(
        pipeline=pipe,
        model=model_id,
        model_path=source,
        backend=AUTO_BACKEND if auto and not pre_quantized else backend.key,
        quant_type=quant_type if backend.quantizes else None,
        compute_dtype=dtype,
        device=device,
        offload=settings.offload.value,
        components=components,
        load_seconds=time.perf_counter() - start,
        pre_quantized=pre_quantized,
        defaults=_model_defaults(pipe, source, denoiser),
        extra=extra,
    )
    from pipelines.quality_guard import guard

    try:
        guard(loaded, settings, load_pipeline)  # QDS_QUALITY_CHECK; raises QualityRefused
    except Exception:
        loaded.release()
        raise
    return loaded
