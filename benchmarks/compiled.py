"""QDS_COMPILE per backend on CPU: eager vs regional torch.compile, in one fresh process each.

Uses the service's own code path: `service.engine.compile_denoiser` (compile_repeated_blocks)
and `service.engine.default_warmup` (what start-up runs before /readyz turns 200). A backend
whose compile or warm-up fails is recorded with the error text.
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
    fmt,
    image_distance,
    md_table,
    meta_line,
    prepared_settings,
    run_meta,
    summarize,
    write_json,
)

CASES: list[tuple[str, str | None]] = [
    ("none", None),
    ("quanto", "int8"),
    ("torchao", "int8wo"),
    ("gguf", "Q8_0"),
]
CASE_TIMEOUT_S = 300


def run_case(settings: Any, runs: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(TORCH_THREADS)
    from quantization.generate import GenerationRequest, generate
    from quantization.loader import load_pipeline
    from service.engine import compile_denoiser, default_warmup

    backend, qtype = settings.quant_backend, settings.quant_type
    loaded = load_pipeline(settings)
    size = loaded.defaults.size

    def timed() -> tuple[list[float], Any]:
        times, image = [], None
        for i in range(runs):
            t0 = time.perf_counter()
            res = generate(loaded, GenerationRequest(PROMPT, seed=i))
            times.append(time.perf_counter() - t0)
            image = image if image is not None else res.images[0]
        return times, image

    for i in range(2):
        generate(loaded, GenerationRequest(PROMPT, seed=i))
    eager, eager_img = timed()
    out: dict[str, Any] = {
        "backend": backend,
        "quant_type": qtype,
        "eager_seconds": summarize(eager),
    }
    stage = "compile_repeated_blocks"
    try:
        t0 = time.perf_counter()
        compile_denoiser(loaded)
        out["compile_call_seconds"] = time.perf_counter() - t0
        stage = "warm-up (default_warmup, compilation happens here)"
        t0 = time.perf_counter()
        default_warmup(loaded, [(size, size)])
        out["warmup_seconds"] = time.perf_counter() - t0
        stage = "first request after warm-up"
        t0 = time.perf_counter()
        generate(loaded, GenerationRequest(PROMPT, seed=99))
        out["first_request_after_warmup_seconds"] = time.perf_counter() - t0
        stage = "timed compiled runs"
        compiled, compiled_img = timed()
    except Exception as exc:
        out["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:1500]}"
        return out
    out["compiled_seconds"] = summarize(compiled)
    out["speedup_median"] = out["eager_seconds"]["median"] / out["compiled_seconds"]["median"]
    out["compiled_vs_eager_seed0"] = image_distance(eager_img, compiled_img)
    return out


def measure(quick: bool, work: Path) -> dict[str, Any]:
    cases = CASES[:1] if quick else CASES
    runs = 3 if quick else 8
    results = []
    for backend, qtype in cases:
        cid = f"{backend}:{qtype or '-'}"
        settings_path = work / f"{cid}.settings.json"
        # The backend's offline step (GGUF: convert the denoiser) before the case's process.
        settings = prepared_settings((backend, qtype), work, device="cpu")
        write_json(settings_path, settings.model_dump(mode="json"))
        argv = [sys.executable, "-m", "benchmarks.compiled", "--case", cid]
        argv += ["--runs", str(runs), "--result", str(work / f"{cid}.json")]
        argv += ["--settings", str(settings_path)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            results.append(
                {
                    "backend": backend,
                    "quant_type": qtype,
                    "error": f"timed out after "
                    f"{CASE_TIMEOUT_S}s (compile + warm-up on 2 shared cores)",
                }
            )
            continue
        path = work / f"{cid}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            row = {"backend": backend, "quant_type": qtype, "error": " | ".join(tail)}
        row["process_seconds"] = time.perf_counter() - t0
        results.append(row)
    return {
        "meta": run_meta("qdserve bench compile" + (" --quick" if quick else "")),
        "runs": runs,
        "method": "fresh process per backend: load, 2 eager warm-ups, timed eager runs; then "
        "service.engine.compile_denoiser + default_warmup (the QDS_COMPILE start-up path), one "
        "untimed-for-stats first request, timed compiled runs at the same seeds.",
        "cases": results,
    }


def render(data: dict[str, Any]) -> str:
    rows = []
    errors = []
    for r in data["cases"]:
        name = f"{r['backend']} {r['quant_type'] or ''}".strip()
        eager = r.get("eager_seconds", {}).get("median")
        comp = (r.get("compiled_seconds") or {}).get("median")
        dist = r.get("compiled_vs_eager_seed0") or {}
        psnr = "identical" if dist.get("identical") else fmt(dist.get("psnr_db"), 1)
        rows.append(
            [
                name,
                fmt(eager and eager * 1e3, 1),
                fmt(comp and comp * 1e3, 1),
                fmt(r.get("speedup_median"), 2),
                fmt(r.get("warmup_seconds"), 1),
                fmt(r.get("first_request_after_warmup_seconds", 0) * 1e3, 1)
                if "first_request_after_warmup_seconds" in r
                else "-",
                psnr if dist else "-",
                "failed (below)" if "error" in r else "ok",
            ]
        )
        if "error" in r:
            errors.append(f"- **{name}**: `{r['error']}`")
    header = [
        "backend",
        "eager ms (median)",
        "compiled ms (median)",
        "speedup",
        "warm-up s (start-up)",
        "1st request ms",
        "PSNR compiled vs eager",
        "status",
    ]
    parts = [
        "# QDS_COMPILE (regional torch.compile, CPU inductor)",
        meta_line(data["meta"]),
        data["method"] + f" {data['runs']} timed runs each.",
        md_table(header, rows),
    ]
    if errors:
        parts += ["Errors, as raised:", "\n".join(errors)]
    return "\n\n".join(parts) + "\n"


def headline(data: dict[str, Any]) -> str:
    parts = []
    for r in data["cases"]:
        name = f"{r['backend']} {r['quant_type'] or ''}".strip()
        if "error" in r:
            parts.append(f"{name}: failed")
        else:
            parts.append(
                f"{name}: x{r['speedup_median']:.2f} (warm-up {r['warmup_seconds']:.0f} s)"
            )
    return "; ".join(parts)


def main(out: Path, quick: bool) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qds-compile-") as tmp:
        data = measure(quick, Path(tmp))
    data["headline"] = headline(data)
    write_json(out / "compile.json", data)
    (out / "compile.md").write_text(render(data))
    return data


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--settings", type=Path, required=True, help="prepared, as JSON")
    args = parser.parse_args(argv)
    from quantization.settings import QuantSettings

    settings = QuantSettings(**json.loads(args.settings.read_text()))
    result = run_case(settings, args.runs)
    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
