"""Issue 26's GPU rows, prepared for a lent GPU: compile on CUDA, fp8 with compile, and step
caching on a Flux-dev-size denoiser (random bf16 weights, 1024x1024, one image).

    python -m benchmarks.gpu_speedups --out speedups.json [--budget-s 480] [--tiny --size 64]

Cases, each written to the JSON as soon as it is measured (a run cut short keeps them):

- `denoiser`: seconds per denoiser step, bf16 eager vs `model.compile()` (the first compiled
  call's seconds recorded apart as the compile), and the same with torchao `float8dq` (where
  the card supports it: compute capability >= 8.9; elsewhere the reason is recorded);
- `step_cache`: one 28-step denoise of one image through the step loop's own split forward
  (`pipelines.step_cache.cached_forward`, the code the server runs) per setting, eager: wall
  seconds, steps computed / skipped, and the final latents' PSNR against the uncached run.
  With random weights the PSNR says how far the cached latents drift, not how an image looks:
  image quality needs a real checkpoint, which no run here can download.

`--tiny` shrinks the denoiser to one block of each kind so the script can be dry-run on a CPU
(tests/unit/test_gpu_speedups.py does); no number from a dry run is a GPU result.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu import FLUX_DEV, _Cuda, _inputs, bf16_weights, run_header

CACHE_SETTINGS = ("off", "taylorseer:6", "taylorseer:4", "taylorseer:2", "fbcache:0.2")
DENOISE_STEPS = 28


def _build(tiny: bool, device: str) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_DEV)
    if tiny:
        config.update(num_layers=1, num_single_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    with bf16_weights(), torch.device(device):
        model = FluxTransformer2DModel(**config)
    return model.eval()


def _step_seconds(model: Any, inputs: dict[str, Any], steps: int) -> list[float]:
    import torch

    cuda = _Cuda()
    times = []
    with torch.no_grad():
        for _ in range(steps):
            cuda.sync()
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            cuda.sync()
            times.append(time.perf_counter() - t0)
    return times


def denoiser_case(model: Any, inputs: dict[str, Any], steps: int, compile_: bool) -> dict[str, Any]:
    """Eager seconds per step, then (with `compile_`) the compiled ones: the first compiled
    call is the compile (recorded apart), as a server's warm-up would pay it."""
    import torch

    cuda = _Cuda()
    _step_seconds(model, inputs, 1)  # warm-up: kernel selection, lazy init
    eager = _step_seconds(model, inputs, steps)
    out: dict[str, Any] = {"eager_seconds_per_step": round(statistics.median(eager), 4)}
    if compile_:
        model.compile()
        cuda.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(**inputs, return_dict=False)
        cuda.sync()
        out["compile_seconds"] = round(time.perf_counter() - t0, 1)
        compiled = _step_seconds(model, inputs, steps)
        out["compiled_seconds_per_step"] = round(statistics.median(compiled), 4)
        out["compiled_vs_eager"] = round(
            out["eager_seconds_per_step"] / out["compiled_seconds_per_step"], 3
        )
        model._compiled_call_impl = None  # back to eager for the next case
        torch._dynamo.reset()
    return out


def fp8_refusal(device: str) -> str | None:
    """Why torchao float8dq cannot run here, or None (CUDA, compute capability >= 8.9)."""
    import torch

    if device != "cuda":
        return "float8dq needs a CUDA GPU (torchao's float8 matmuls have no CPU kernels)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"float8dq needs compute capability >= 8.9; this card has {major}.{minor}"
    return None


def quantize_fp8(model: Any) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig())


def denoise(model: Any, inputs: dict[str, Any], setting: str) -> tuple[Any, dict[str, Any]]:
    """One image through DENOISE_STEPS flow-matching Euler steps via the step loop's split
    forward with `setting` (the server's code path for a cached sample)."""
    import torch

    from pipelines import step_cache

    spec = step_cache.parse(setting)
    state = step_cache.SampleCache(spec) if spec is not None else None
    counts = step_cache.Counts()
    sigmas = torch.linspace(1.0, 0.0, DENOISE_STEPS + 1)
    latents = inputs["hidden_states"].clone()
    cuda = _Cuda()
    cuda.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(DENOISE_STEPS):
            step_inputs = dict(inputs, hidden_states=latents)
            step_inputs["timestep"] = torch.full_like(inputs["timestep"], float(sigmas[i]))
            velocity = step_cache.cached_forward(model, "cond", [(state, 1)], counts, **step_inputs)
            latents = latents + (float(sigmas[i + 1]) - float(sigmas[i])) * velocity
    cuda.sync()
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {"seconds": round(seconds, 3)}
    if state is not None:
        info.update(steps_computed=state.computed, steps_skipped=state.skipped)
    return latents, info


def psnr(a: Any, b: Any) -> float:
    """PSNR of latents `a` against `b`, over `b`'s value range."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    span = float(b.float().max() - b.float().min())
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def step_cache_case(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reference = None
    denoise(model, inputs, "off")  # warm-up
    for setting in CACHE_SETTINGS:
        latents, info = denoise(model, inputs, setting)
        if reference is None:
            reference = latents
        else:
            info["latent_psnr_db_vs_off"] = round(psnr(latents, reference), 1)
            info["speedup_vs_off"] = round(out["off"]["seconds"] / info["seconds"], 3)
        out[setting] = info
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="timed denoiser calls per case")
    parser.add_argument("--tiny", action="store_true", help="a one-block denoiser (CPU dry run)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    begin = time.perf_counter()
    results: dict[str, Any] = {**run_header(device, args.size), "tiny": args.tiny, "cases": {}}

    def record(name: str, run: Any) -> None:
        if time.perf_counter() - begin > args.budget_s:
            results["cases"][name] = {"error": "skipped: time budget spent"}
        else:
            try:
                results["cases"][name] = run()
            except Exception as exc:
                results["cases"][name] = {
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "trace": traceback.format_exc()[-1500:],
                }
        print(name, json.dumps(results["cases"][name])[:300], flush=True)
        args.out.write_text(json.dumps(results, indent=2))

    model = _build(args.tiny, device)
    inputs = _inputs("flux-dev", args.size, torch.bfloat16, device)
    compile_ = not args.no_compile
    # Step caching first: it is the row this script exists for, and it needs no compile.
    record("step_cache bf16 eager", lambda: step_cache_case(model, inputs))
    record("denoiser bf16", lambda: denoiser_case(model, inputs, args.steps, compile_))
    refusal = fp8_refusal(device)
    if refusal:
        results["cases"]["denoiser float8dq"] = {"error": f"unavailable: {refusal}"}
        args.out.write_text(json.dumps(results, indent=2))
    else:
        quantize_fp8(model)
        record("denoiser float8dq", lambda: denoiser_case(model, inputs, args.steps, compile_))
    results["wall_seconds"] = round(time.perf_counter() - begin, 1)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
