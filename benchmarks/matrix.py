"""Backend matrix on this machine: every backend / quant type on the embedded model.

Each case runs in its own fresh Python process (so peak memory and load time of one case
are not polluted by another): load -> warm-up -> timed generations at fixed seeds. The parent
compares each case's images with the unquantized (`none`) images of the same seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROMPT,
    REPO,
    TORCH_THREADS,
    PeakRSS,
    Variant,
    fmt,
    image_distance,
    md_table,
    meta_line,
    mib,
    prepared_settings,
    registry_variants,
    run_meta,
    summarize,
    write_json,
)

# The full run takes every variant the registry can run here (`registry_variants`); those it
# cannot run are recorded with the reason. `--quick` (tests, smoke) takes these two.
QUICK_CASES: list[Variant] = [("none", None), ("quanto", "int8")]
SEEDS = [0, 1, 2, 3]


def case_id(backend: str, qtype: str | None) -> str:
    return f"{backend}:{qtype or '-'}"


# -- one case, in a child process -------------------------------------------------------
def run_case(settings: Any, runs: int, warmup: int, out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(TORCH_THREADS)
    import diffusers  # noqa: F401  (imported before the timed load, like a running service)

    from pipelines.generate import GenerationRequest, generate
    from pipelines.loader import load_pipeline
    from quantization.backends import get_backend

    backend, qtype = settings.quant_backend, settings.quant_type
    sampler = PeakRSS()
    rss0 = sampler.rss()
    loaded = load_pipeline(settings)
    rss_loaded = sampler.rss()
    denoiser = loaded.components.get("transformer") or loaded.components["unet"]
    bits = get_backend(backend).weight_bits(qtype) if backend != "none" else 32.0

    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(PROMPT, seed=seed)

    for i in range(warmup):
        generate(loaded, req(SEEDS[i % len(SEEDS)]))
    times: list[float] = []
    saved: set[int] = set()
    with sampler.track():
        for i in range(runs):
            seed = SEEDS[i % len(SEEDS)]
            t0 = time.perf_counter()
            result = generate(loaded, req(seed))
            times.append(time.perf_counter() - t0)
            if seed not in saved:
                result.images[0].save(out / f"{case_id(backend, qtype)}-seed{seed}.png")
                saved.add(seed)
    return {
        "backend": backend,
        "quant_type": qtype,
        "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
        "load_seconds": loaded.load_seconds,
        "rss_after_load_delta_bytes": rss_loaded - rss0,
        "denoiser_parameters": denoiser.parameters,
        "denoiser_storage_bytes": denoiser.storage_bytes,
        "pipeline_storage_bytes": loaded.storage_bytes,
        "weight_bits": bits,
        "ratio_to_bf16": denoiser.storage_bytes / (denoiser.parameters * 2),
        "ratio_to_floor": denoiser.storage_bytes / (denoiser.parameters * bits / 8),
        "peak_rss_delta_bytes": sampler.delta,
        "latency_seconds": summarize(times),
        "latency_all": times,
        "size": loaded.defaults.size,
        "steps": loaded.defaults.steps,
        "runs": runs,
        "warmup": warmup,
    }


# -- the parent ------------------------------------------------------------------------
def _spawn_case(settings: Any, work: Path, runs: int, warmup: int) -> dict[str, Any]:
    """Run one prepared case in a fresh process; its settings travel as JSON."""
    backend, qtype = settings.quant_backend, settings.quant_type
    cid = case_id(backend, qtype)
    result_path = work / f"{cid}.json"
    settings_path = work / f"{cid}.settings.json"
    write_json(settings_path, settings.model_dump(mode="json"))
    argv = [sys.executable, "-m", "benchmarks.matrix", "--case", cid, "--work", str(work)]
    argv += ["--runs", str(runs), "--warmup", str(warmup), "--settings", str(settings_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"backend": backend, "quant_type": qtype, "error": " | ".join(tail)}
    return dict(json.loads(result_path.read_text()))


def measure(out_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    runnable, skipped = registry_variants()
    cases = QUICK_CASES if quick else runnable
    runs, warmup = (3, 1) if quick else (12, 2)
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    unavailable = [
        {"backend": b, "quant_type": q, "unavailable": reason, "measured": False}
        for (b, q), reason in skipped.items()
    ]
    for backend, qtype in cases:
        t0 = time.perf_counter()
        try:
            # The backend's offline step (GGUF: convert the denoiser), outside the timed load.
            settings = prepared_settings((backend, qtype), work, device="cpu")
        except Exception as exc:  # one broken backend must not hide the others
            results.append(
                {"backend": backend, "quant_type": qtype, "error": f"prepare failed: {exc}"}
            )
            continue
        prepare_s = time.perf_counter() - t0
        row = _spawn_case(settings, work, runs, warmup)
        row["prepare_seconds"] = prepare_s
        row["measured"] = "error" not in row
        results.append(row)
    # Distance from the unquantized images at the same seeds.
    ref = case_id("none", None)
    for row in results:
        if not row.get("measured"):
            continue
        dists = []
        for seed in SEEDS:
            a = work / f"{ref}-seed{seed}.png"
            b = work / f"{case_id(row['backend'], row['quant_type'])}-seed{seed}.png"
            if a.exists() and b.exists():
                from PIL import Image

                dists.append(image_distance(Image.open(a), Image.open(b)))
        if dists:
            finite = [d["psnr_db"] for d in dists if d["psnr_db"] is not None]
            row["quality_vs_none"] = {
                "seeds": len(dists),
                "psnr_db_mean": sum(finite) / len(finite) if finite else None,
                "psnr_db_min": min(finite) if finite else None,
                "identical_seeds": sum(1 for d in dists if d["identical"]),
                "mean_abs_diff": sum(float(d["mean_abs_diff"] or 0) for d in dists) / len(dists),
            }
    return {
        "meta": run_meta("qdserve bench matrix" + (" --quick" if quick else "")),
        "model": "embedded (small Flux, random weights)",
        "prompt": PROMPT,
        "seeds": SEEDS,
        "memory_method": (
            "peak RSS delta: psutil RSS of the case's own process, sampled every 2 ms on a "
            "thread during the timed generations, minus the RSS just before them (a lower "
            "bound: spikes between samples can be missed). Each case runs in a fresh process."
        ),
        "storage_method": (
            "real bytes of the denoiser's tensors (quantized tensor subclasses walked); "
            "ratio_to_bf16 = storage / (parameters x 2); ratio_to_floor = storage / "
            "(parameters x weight_bits / 8), weight_bits = 32 for `none` (fp32 on CPU)."
        ),
        "cases": results + unavailable,
    }


def render(data: dict[str, Any]) -> str:
    rows = []
    for r in data["cases"]:
        name = f"{r['backend']} {r['quant_type'] or ''}".strip()
        if not r.get("measured"):
            why = r.get("unavailable") or r.get("error", "")
            rows.append([name, "not run: " + str(why).replace("|", "/")] + ["-"] * 9)
            continue
        lat = r["latency_seconds"]
        q = r.get("quality_vs_none") or {}
        psnr = (
            "identical"
            if q.get("identical_seeds") == q.get("seeds")
            else fmt(q.get("psnr_db_mean"), 1)
        )
        rows.append(
            [
                name,
                fmt(r["load_seconds"], 2),
                mib(r["denoiser_storage_bytes"]),
                fmt(r["ratio_to_bf16"], 3),
                fmt(r["ratio_to_floor"], 3),
                mib(r["peak_rss_delta_bytes"]),
                fmt(lat["median"] * 1000, 1),
                f"{lat['min'] * 1000:.1f}–{lat['max'] * 1000:.1f}",
                fmt(lat["p75"] * 1000 - lat["p25"] * 1000, 1),
                psnr,
                fmt(q.get("mean_abs_diff"), 2),
            ]
        )
    header = [
        "backend",
        "load s",
        "denoiser MiB",
        "vs bf16",
        "vs floor",
        "peak RSS Δ MiB",
        "latency ms (median)",
        "min–max ms",
        "IQR ms",
        "PSNR dB vs none",
        "mean |Δ| (0-255)",
    ]
    first = next((r for r in data["cases"] if r.get("measured")), {})
    return (
        "\n\n".join(
            [
                "# Backend matrix (CPU, embedded model)",
                meta_line(data["meta"]),
                f"Model: {data['model']}, {first.get('size')}x{first.get('size')}, "
                f"{first.get('steps')} steps, prompt {data['prompt']!r}, seeds {data['seeds']}; "
                f"{first.get('runs')} timed runs per case after {first.get('warmup')} warm-up.",
                md_table(header, rows),
                "Memory: " + data["memory_method"],
                "Storage: " + data["storage_method"],
                "![memory vs latency](matrix.png)",
            ]
        )
        + "\n"
    )


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["cases"] if r.get("measured")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in rows:
        name = f"{r['backend']} {r['quant_type'] or ''}".strip()
        x = r["latency_seconds"]["median"] * 1000
        ax1.scatter(x, r["peak_rss_delta_bytes"] / 2**20)
        ax1.annotate(name, (x, r["peak_rss_delta_bytes"] / 2**20), fontsize=8)
        ax2.scatter(x, r["denoiser_storage_bytes"] / 2**20)
        ax2.annotate(name, (x, r["denoiser_storage_bytes"] / 2**20), fontsize=8)
    ax1.set_xlabel("latency per image, median (ms)")
    ax1.set_ylabel("peak RSS delta during generation (MiB)")
    ax1.set_title("peak memory vs latency")
    ax2.set_xlabel("latency per image, median (ms)")
    ax2.set_ylabel("denoiser storage (MiB)")
    ax2.set_title("weight storage vs latency")
    fig.suptitle(f"qdserve backend matrix, CPU, {data['meta']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str], out_dir: Path, quick: bool) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qds-matrix-") as tmp:
        data = measure(out_dir, Path(tmp), quick)
    write_json(out_dir / "matrix.json", data)
    (out_dir / "matrix.md").write_text(render(data))
    plot(data, out_dir / "matrix.png")
    return data


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settings", type=Path, required=True, help="prepared, as JSON")
    args = parser.parse_args(argv)
    from quantization.settings import QuantSettings

    settings = QuantSettings(**json.loads(args.settings.read_text()))
    result = run_case(settings, args.runs, args.warmup, args.work)
    write_json(args.work / f"{args.case}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
