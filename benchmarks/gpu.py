"""GPU benchmark: real-size denoisers (Flux-dev, SD3-medium) with random weights, per backend.

Memory and speed do not depend on the weight values, so the published configs are built with
random weights on the GPU, saved once, and reloaded through each backend's diffusers config.
Measures: GPU memory after load, the GPU collector's gauges vs the real storage bytes, peak
memory during a 1024x1024 denoiser step, and seconds per step. Only the denoiser is measured
(the published anchors include the text encoders: their bf16 T5-XXL alone is ~9.5 GB).

Run: `python -m benchmarks.gpu --out results.json [--budget-s 420]`. Results are written
after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
CASES = [
    ("none", None),
    ("bitsandbytes_4bit", "nf4"),
    ("bitsandbytes_8bit", "int8"),
    ("torchao", "int8wo"),
    ("quanto", "int8"),
    ("torchao", "float8dq"),
    ("modelopt", "FP8"),
]


def _inputs(arch: str, size: int, dtype: Any, device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator(device).manual_seed(0)
    lat = size // 8
    if arch == "flux-dev":
        tokens = (lat // 2) ** 2
        ids = torch.zeros(tokens, 3, device=device)
        return {
            "hidden_states": torch.randn(1, tokens, 64, generator=g, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                1, 512, 4096, generator=g, device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(1, 768, generator=g, device=device, dtype=dtype),
            "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "img_ids": ids,
            "txt_ids": torch.zeros(512, 3, device=device),
            "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        }
    return {
        "hidden_states": torch.randn(1, 16, lat, lat, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 333, 4096, generator=g, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, 2048, generator=g, device=device, dtype=dtype),
        "timestep": torch.tensor([500.0], device=device, dtype=dtype),
    }


@contextmanager
def bf16_weights() -> Iterator[None]:
    """Modules built inside get bf16 parameters directly (a 12 B fp32 build would need 48 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_and_save(arch: str, config: dict[str, Any], folder: Path, device: str) -> int:
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if arch == "flux-dev" else SD3Transformer2DModel
    torch.manual_seed(0)
    with bf16_weights(), torch.device(device):
        model = cls(**config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="20GB")
    del model
    _Cuda().reset()
    return params


def _load_gguf(cls: Any, folder: Path, qtype: str, dtype: Any, device: str, config: Any) -> Any:
    import torch
    from safetensors.torch import load_file

    from quantization.backends.gguf.convert import write_gguf

    gguf_path = folder.parent / f"{folder.name}-{qtype}.gguf"
    if not gguf_path.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        write_gguf(state, gguf_path, qtype, folder.name, cls.__name__)
        del state
    t0 = time.perf_counter()
    model = cls.from_single_file(
        str(gguf_path), quantization_config=config, config=str(folder), torch_dtype=dtype
    ).to(device)
    model.qds_load_seconds = time.perf_counter() - t0
    return model


class _Cuda:
    """torch.cuda calls that become no-ops on CPU, so the script can be dry-run there."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.on = torch.cuda.is_available()

    def sync(self) -> None:
        if self.on:
            self.torch.cuda.synchronize()

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.on else 0

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.on else 0

    def reset(self) -> None:
        gc.collect()
        if self.on:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()


def measure(
    arch: str, folder: Path, backend_key: str, qtype: str | None, size: int, steps: int, device: str
) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from quantization.backends import ConfigRequest, get_backend
    from quantization.environment import detect_device
    from quantization.storage import module_storage
    from service.gpu_metrics import read_gpu_gauges

    cls = FluxTransformer2DModel if arch == "flux-dev" else SD3Transformer2DModel
    backend = get_backend(backend_key)
    reason = backend.unavailable_reason(qtype, detect_device())
    if reason:
        return {"error": f"unavailable: {reason}"}
    dtype = torch.bfloat16
    config = backend.diffusers_config(ConfigRequest(quant_type=qtype, compute_dtype=dtype))
    cuda = _Cuda()
    cuda.reset()
    base_alloc = cuda.allocated()
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        kwargs["quantization_config"] = config
    if backend_key == "gguf":
        # Convert outside the timed load: the conversion is an offline step for operators.
        model = _load_gguf(cls, folder, qtype or "Q8_0", dtype, device, config)
        start = time.perf_counter() - model.qds_load_seconds
    else:
        try:
            model = cls.from_pretrained(folder, device_map=device, **kwargs)
        except Exception:
            model = cls.from_pretrained(folder, **kwargs).to(device)
    cuda.sync()
    load_s = time.perf_counter() - start
    after_load = cuda.allocated() - base_alloc
    report = module_storage(model)
    gauges = read_gpu_gauges()
    inputs = _inputs(arch, size, dtype, device)
    cuda.reset()
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            cuda.sync()
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            cuda.sync()
            if i:  # the first call is warm-up (kernel selection, lazy init)
                times.append(time.perf_counter() - t0)
    peak = cuda.peak() - base_alloc
    result = {
        "load_seconds": round(load_s, 2),
        "parameters": report.parameters,
        "storage_bytes": report.storage_bytes,
        "gpu_allocated_after_load_bytes": after_load,
        "gauge_allocated_bytes": gauges.get("qds_gpu_memory_allocated_bytes{cuda:0}"),
        "gauge_total_bytes": gauges.get("qds_gpu_memory_total_bytes{cuda:0}"),
        "peak_bytes": peak,
        "seconds_per_step_median": round(statistics.median(times), 4),
        "seconds_per_step_all": [round(t, 4) for t in times],
        "ratio_storage_vs_bf16": round(report.storage_bytes / (report.parameters * 2), 4),
        "ratio_storage_vs_floor": round(
            report.storage_bytes / (report.parameters * backend.weight_bits(qtype) / 8), 4
        ),
    }
    del model, inputs
    cuda.reset()
    return result


def run_header(device: str, size: int) -> dict[str, Any]:
    """What every GPU result file starts with: when, on which card, which versions."""
    import diffusers
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "dry_run": device != "cuda",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "size": size,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qds-gpu-bench"))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--archs", default="flux-dev,sd3-medium")
    parser.add_argument("--cases", default="", help="comma list backend:qtype (default all)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU dry run)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    begin = time.perf_counter()
    results: dict[str, Any] = {**run_header(device, args.size), "timed_steps": args.steps}
    results["archs"] = {}
    configs = {"flux-dev": dict(FLUX_DEV), "sd3-medium": dict(SD3_MEDIUM)}
    if args.tiny:
        configs["flux-dev"].update(num_layers=1, num_single_layers=1, num_attention_heads=2)
        configs["sd3-medium"].update(num_layers=1, num_attention_heads=2)
    for arch in args.archs.split(","):
        folder = args.workdir / arch
        shutil.rmtree(folder, ignore_errors=True)
        entry: dict[str, Any] = {"cases": {}}
        results["archs"][arch] = entry
        t0 = time.perf_counter()
        entry["parameters"] = build_and_save(arch, configs[arch], folder, device)
        entry["build_seconds"] = round(time.perf_counter() - t0, 1)
        cases = CASES
        if args.cases:
            cases = [(c.split(":")[0], c.split(":")[1] or None) for c in args.cases.split(",")]
        for backend, qtype in cases:
            name = f"{backend}:{qtype or '-'}"
            if time.perf_counter() - begin > args.budget_s:
                entry["cases"][name] = {"error": "skipped: benchmark time budget spent"}
                continue
            try:
                entry["cases"][name] = measure(
                    arch, folder, backend, qtype, args.size, args.steps, device
                )
            except Exception as exc:
                entry["cases"][name] = {
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "trace": traceback.format_exc()[-1500:],
                }
            print(arch, name, json.dumps(entry["cases"][name])[:300], flush=True)
            args.out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - begin, 1)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
