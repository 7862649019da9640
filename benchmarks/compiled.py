"""QDS_COMPILE per backend on CPU: the engine's step loop eager vs compiled, one fresh
process per backend with a fresh inductor cache (the first start's cost), then a second
process on that cache (a restart's cost).

Uses the service's own code path: `engine.compiling.compile_denoiser` (at
QDS_COMPILE_SCOPE's default: the whole denoiser on a CPU; `bench compile-serving` serves
blocks beside it) and
`default_warmup` (what start-up runs before /readyz turns 200: the step loop at 1 and 2
images, on the main thread and a lane), then `pipelines.stepping.StepBatch` as the engine
drives it. Images are compared with the eager pipeline call (`generate()`), as 8-bit pixels:
the same-seed tolerance the README states is 2/255. A backend whose compile or warm-up fails
is recorded with the error text. `QuantBackend.compiles_by_default` (QDS_COMPILE=auto) reads
this table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROMPT,
    REPO,
    fmt,
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
    ("torchao", "int8dq"),
    ("gguf", "Q8_0"),
]
CASE_TIMEOUT_S = 600
BATCHES = (1, 4)


def _pixels(images: list[Any]) -> Any:
    import numpy as np

    return np.stack([np.asarray(im).astype(np.int16) for im in images])


def run_case(settings: Any, runs: int, warmup_only: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from engine.compiling import compile_denoiser, compile_scope, default_warmup
    from engine.lanes import Lanes
    from pipelines.generate import GenerationRequest, generate, resolve
    from pipelines.loader import load_pipeline
    from pipelines.stepping import StepBatch

    loaded = load_pipeline(settings)
    size = loaded.defaults.size
    out: dict[str, Any] = {"backend": settings.quant_backend, "quant_type": settings.quant_type}
    # QDS_COMPILE_SCOPE=auto, as served: the whole denoiser on a CPU.
    out["scope"] = compile_scope("auto", loaded)
    if warmup_only:
        compile_denoiser(loaded)
        t0 = time.perf_counter()
        default_warmup(loaded, [(size, size)], lanes=2)
        out["warmup_seconds"] = time.perf_counter() - t0
        return out

    def request(seed: int, images: int = 1) -> Any:
        return resolve(loaded.defaults, GenerationRequest(PROMPT, seed=seed, num_images=images))

    def step_loop(images: int, seed: int = 0) -> tuple[float, list[Any]]:
        batch = StepBatch(loaded, max_images=images)
        batch.add("r", request(seed, images))
        t0 = time.perf_counter()
        done: dict[str, Any] = {}
        while len(batch):
            done.update(dict(batch.step()))
        return time.perf_counter() - t0, done["r"].images

    def timed() -> dict[str, Any]:
        return {str(n): summarize([step_loop(n, seed)[0] for seed in range(runs)]) for n in BATCHES}

    reference = _pixels(generate(loaded, request(5, 4)).images)  # the eager pipeline call
    for n in BATCHES:
        step_loop(n)  # warm caches
    out["eager_seconds"] = timed()
    stage = "compile_denoiser"
    try:
        compile_denoiser(loaded)
        stage = "warm-up (default_warmup, compilation happens here)"
        t0 = time.perf_counter()
        default_warmup(loaded, [(size, size)], lanes=2)
        out["warmup_seconds"] = time.perf_counter() - t0
        frames = counters["frames"]["total"]
        stage = "timed compiled runs"
        out["compiled_seconds"] = timed()
        alone = _pixels(step_loop(1, 5)[1])
        batched = _pixels(step_loop(4, 5)[1])
        stage = "two lanes at once"
        pair = [StepBatch(loaded, max_images=8) for _ in range(2)]
        for i, b in enumerate(pair):
            b.add(str(i), replace(request(i), num_images=3 + i))
        while len(pair[0]) or len(pair[1]):
            Lanes.get(2).run_or_raise([b.step for b in pair])
    except Exception as exc:
        out["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:1500]}"
        return out
    out["compiles_after_warmup"] = counters["frames"]["total"] - frames
    out["max_pixel_diff_alone"] = int(abs(alone[0] - reference[0]).max())
    out["max_pixel_diff_batch4"] = int(abs(batched - reference).max())
    out["speedup"] = {
        n: out["eager_seconds"][n]["median"] / out["compiled_seconds"][n]["median"]
        for n in out["eager_seconds"]
    }
    return out


def _child_run(argv: list[str], cache: Path) -> subprocess.CompletedProcess[str] | None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=REPO, env=env
        )
    except subprocess.TimeoutExpired:
        return None


def measure(quick: bool, work: Path) -> dict[str, Any]:
    cases = CASES[:1] if quick else CASES
    runs = 2 if quick else 5
    results = []
    for backend, qtype in cases:
        cid = f"{backend}:{qtype or '-'}"
        settings_path = work / f"{cid}.settings.json"
        # The backend's offline step (GGUF: convert the denoiser) before the case's process.
        settings = prepared_settings((backend, qtype), work, device="cpu")
        write_json(settings_path, settings.model_dump(mode="json"))
        cache = work / f"{cid}.inductor-cache"  # empty: the first start's compile
        argv = [sys.executable, "-m", "benchmarks.compiled", "--case", cid]
        argv += ["--runs", str(runs), "--settings", str(settings_path)]
        t0 = time.perf_counter()
        proc = _child_run([*argv, "--result", str(work / f"{cid}.json")], cache)
        path = work / f"{cid}.json"
        if proc is None:
            row = {"error": f"timed out after {CASE_TIMEOUT_S}s (compile + warm-up)"}
        elif path.exists():
            row = json.loads(path.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            row = {"error": " | ".join(tail)}
        row.update(backend=backend, quant_type=qtype, process_seconds=time.perf_counter() - t0)
        if "error" not in row:
            # A restart: the same inductor cache, now filled.
            again = work / f"{cid}.again.json"
            _child_run([*argv, "--warmup-only", "--result", str(again)], cache)
            if again.exists():
                row["warmup_seconds_cached"] = json.loads(again.read_text())["warmup_seconds"]
        results.append(row)
    return {
        "meta": run_meta("qdserve bench compile" + (" --quick" if quick else ""), 2),
        "runs": runs,
        "method": "fresh process per backend, torch's default threads (2), an empty inductor "
        "cache: load; the eager pipeline call (generate) at batch 4, seed 5, as the reference; "
        "the step loop (StepBatch, as the engine drives it) eager at batch 1 and 4; then "
        "compile_denoiser at QDS_COMPILE_SCOPE's default (the whole denoiser on a CPU) + "
        "default_warmup (the QDS_COMPILE start-up path, 2 lanes); the step "
        "loop compiled at batch 1 and 4; new compiles counted after the warm-up (batch 1, 4, "
        "and batches of 3 and 4 on two lanes at once); then a second process on the filled "
        "cache times the warm-up of a restart.",
        "cases": results,
    }


def render(data: dict[str, Any]) -> str:
    rows = []
    errors = []
    for r in data["cases"]:
        name = f"{r['backend']} {r['quant_type'] or ''}".strip()
        row = [name]
        for n in ("1", "4"):
            eager = (r.get("eager_seconds") or {}).get(n, {}).get("median")
            comp = (r.get("compiled_seconds") or {}).get(n, {}).get("median")
            row += [fmt(eager and eager * 1e3, 1), fmt(comp and comp * 1e3, 1)]
            row.append(fmt((r.get("speedup") or {}).get(n), 2))
        row += [
            fmt(r.get("warmup_seconds"), 1),
            fmt(r.get("warmup_seconds_cached"), 1),
            str(r.get("compiles_after_warmup", "-")),
            f"{r['max_pixel_diff_alone']} / {r['max_pixel_diff_batch4']}"
            if "max_pixel_diff_alone" in r
            else "-",
            "failed (below)" if "error" in r else "ok",
        ]
        rows.append(row)
        if "error" in r:
            errors.append(f"- **{name}**: `{r['error']}`")
    header = [
        "backend",
        "eager ms, 1 image",
        "compiled ms, 1",
        "speedup, 1",
        "eager ms, batch 4",
        "compiled ms, 4",
        "speedup, 4",
        "warm-up s (first start)",
        "warm-up s (restart)",
        "compiles after warm-up",
        "max pixel diff vs eager call (/255): alone / batch 4",
        "status",
    ]
    parts = [
        "# QDS_COMPILE (torch.compile of the step loop's denoiser, whole model, CPU inductor)",
        meta_line(data["meta"]),
        data["method"] + f" {data['runs']} timed runs each (ms: one request's whole step loop,"
        " decode included, median).",
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
                f"{name}: x{r['speedup']['1']:.2f} / x{r['speedup']['4']:.2f} at 1 / 4 "
                f"(max diff {r['max_pixel_diff_batch4']}/255, warm-up {r['warmup_seconds']:.0f} s)"
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
    parser.add_argument("--warmup-only", action="store_true")
    args = parser.parse_args(argv)
    from quantization.settings import QuantSettings

    settings = QuantSettings(**json.loads(args.settings.read_text()))
    result = run_case(settings, args.runs, args.warmup_only)
    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
