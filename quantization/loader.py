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

from quantization.backends import BACKENDS, BackendUnavailable, ConfigRequest, get_backend
from quantization.embedded import EMBEDDED_MODEL_ID, T5_MAX_LENGTH, embedded_model_path
from quantization.environment import DeviceInfo, detect_device, resolve_device
from quantization.settings import DENOISERS, OffloadMode, QuantSettings
from quantization.storage import module_storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qdserve.loader")

QDSERVE_META = "qdserve.json"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to fix."""


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


def _saved_quantization(source: str, components: dict[str, str]) -> dict[str, Any] | None:
    """qdserve's own metadata for a pre-quantized folder, else the first component's config."""
    path = Path(source)
    if not path.is_dir():
        return None
    meta = path / QDSERVE_META
    if meta.is_file():
        data = json.loads(meta.read_text())
        if data.get("backend"):
            return data
    for name in components:
        config = path / name / "config.json"
        if config.is_file():
            qc = json.loads(config.read_text()).get("quantization_config")
            if qc:
                return {"backend": qc.get("quant_method"), "quant_type": None}
    return None


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
    settings: QuantSettings, libraries: dict[str, str], denoiser: str, dtype: torch.dtype
) -> dict[str, Any]:
    """component -> quantization config object (diffusers' or transformers' class)."""
    backend = get_backend(settings.quant_backend)
    if backend.key == "none":
        return {}
    req = ConfigRequest(
        quant_type=settings.resolved_quant_type,
        compute_dtype=dtype,
        modules_to_not_convert=tuple(settings.modules_to_not_convert),
        bnb_double_quant=settings.bnb_double_quant,
    )
    mapping: dict[str, Any] = {}
    for wanted in settings.components_to_quantize:
        name = denoiser if wanted == "denoiser" else wanted
        if name not in libraries:
            raise ModelLoadError(
                f"QDS_COMPONENTS_TO_QUANTIZE names {wanted!r}, which this model does not have; "
                f"its components: {', '.join(sorted(libraries))}"
            )
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
    backend = get_backend(settings.quant_backend)
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

    saved = _saved_quantization(source, libraries)
    pre_quantized = saved is not None
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if saved is not None:
        saved_backend = saved.get("backend")
        if backend.key != "none" and not str(saved_backend).startswith(backend.key.split("_")[0]):
            raise ModelLoadError(
                f"QDS_MODEL={settings.model!r} is already quantized with {saved_backend}; "
                f"unset QDS_QUANT_BACKEND or set it to {saved_backend}"
            )
        quant_type = saved.get("quant_type") or quant_type
        if saved_backend in BACKENDS:
            backend = BACKENDS[saved_backend]
            backend.check(quant_type, target, None)
    elif backend.key == "gguf":
        kwargs[denoiser] = _load_gguf_denoiser(settings, index, source, denoiser, dtype)
    else:
        mapping = plan_quantization(settings, libraries, denoiser, dtype)
        if mapping:
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)

    log.info("loading %s with %s %s on %s", model_id, backend.key, quant_type or "", device)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (BackendUnavailable, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"loading {model_id} with {backend.key} failed: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    _place(pipe, device, settings.offload)

    quantized_names = _quantized_components(
        settings, libraries, denoiser, backend.key, pre_quantized
    )
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
    return LoadedPipeline(
        pipeline=pipe,
        model=model_id,
        model_path=source,
        backend=backend.key,
        quant_type=quant_type if backend.key != "none" else None,
        compute_dtype=dtype,
        device=device,
        offload=settings.offload.value,
        components=components,
        load_seconds=time.perf_counter() - start,
        pre_quantized=pre_quantized,
        defaults=_model_defaults(pipe, source, denoiser),
    )


def _quantized_components(
    settings: QuantSettings,
    libraries: dict[str, str],
    denoiser: str,
    backend: str,
    pre_quantized: bool,
) -> set[str]:
    if backend == "none":
        return set()
    if pre_quantized or backend == "gguf":
        return {denoiser} | {
            c for c in settings.components_to_quantize if c in libraries and backend != "gguf"
        }
    return {denoiser if c == "denoiser" else c for c in settings.components_to_quantize}


def _load_gguf_denoiser(
    settings: QuantSettings, index: dict[str, Any], source: str, denoiser: str, dtype: torch.dtype
) -> Any:
    import diffusers
    from diffusers import GGUFQuantizationConfig

    class_name = index[denoiser][1]
    model_cls = getattr(diffusers, class_name)
    if not hasattr(model_cls, "from_single_file"):
        raise ModelLoadError(f"{class_name} cannot load single files; GGUF is not available")
    try:
        return model_cls.from_single_file(
            str(settings.gguf_file),
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            config=source,
            subfolder=denoiser,
            torch_dtype=dtype,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"QDS_GGUF_FILE={str(settings.gguf_file)!r} could not be loaded as the {denoiser} "
            f"of {source}: {exc}"
        ) from exc
