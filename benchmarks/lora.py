"""LoRA on quantized bases, measured: every backend / quant type x the demo LoRA on CPU.

Each cell runs in its own Python process on the embedded demo model, through the service's
own loader (`pipelines.loader.load_pipeline`, after the backend's `prepare`):

1. base images (no adapter) for the probe prompts;
2. `pipe.load_lora_weights(<demo adapter>)`: does it apply, or what does it raise;
3. with the adapter: do the images change, and does the checker see the new color
   (orange adherence) while the six known colors still draw (base-prompt adherence);
4. `disable_lora()` and then `unload_lora_weights()`: is the base output bit-exact again
   (float output arrays compared with `numpy.array_equal`, not PNGs);
5. after a *failed* load, is the base output still bit-exact (the pipeline was not left
   half-patched)?

Results go to docs/benchmarks/lora.{json,md}. Nothing here is taken from documentation:
every cell is what this run saw. `python -m benchmarks.lora [--only none,quanto:int8]`.
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
    DEFAULT_OUT,
    REPO,
    TORCH_THREADS,
    Variant,
    md_table,
    meta_line,
    parse_variant,
    prepared_settings,
    registry_variants,
    replace_section,
    run_meta,
    write_json,
)

ADAPTER = REPO / "pipelines" / "demo_weights" / "lora" / "orange.safetensors"
ADAPTER_NAME = "orange"
SEEDS = [0, 1]
STEPS = 12
GUIDANCE = 3.5


def cell_id(variant: Variant) -> str:
    backend, qtype = variant
    return f"{backend}:{qtype or '-'}"


# -- one cell, in a child process -------------------------------------------------------
def _images(pipe: Any, prompts: list[str], seeds: list[int]) -> Any:
    """Float images (N, H, W, 3) for every (seed, prompt), one generator per image."""
    import numpy as np
    import torch

    jobs = [(p, s) for s in seeds for p in prompts]
    with torch.no_grad():
        out = pipe(
            [p for p, _ in jobs],
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            max_sequence_length=32,
            generator=[torch.Generator().manual_seed(s) for _, s in jobs],
            output_type="np",
        )
    return np.asarray(out.images)


def _adherence(images: Any, prompts: list[str], seeds: list[int]) -> float:
    import numpy as np

    from pipelines.demo_checker import adheres

    jobs = [p for _ in seeds for p in prompts]
    pil = (np.clip(images, 0, 1) * 255).round().astype("uint8")
    return sum(adheres(img, p) for img, p in zip(pil, jobs, strict=True)) / len(jobs)


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def run_cell(settings: Any, adapter: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(TORCH_THREADS)
    from examples.demo.quality import PROMPTS
    from examples.demo.train_lora import LORA_PROMPTS
    from pipelines.loader import load_pipeline

    result: dict[str, Any] = {
        "backend": settings.quant_backend,
        "quant_type": settings.quant_type,
        "measured": True,
    }
    loaded = load_pipeline(settings)
    pipe = loaded.pipeline
    t = time.perf_counter()
    base = _images(pipe, LORA_PROMPTS, SEEDS)
    result["seconds_per_image_base"] = (time.perf_counter() - t) / len(base)
    result["orange_adherence_without"] = _adherence(base, LORA_PROMPTS, SEEDS)
    t = time.perf_counter()
    try:
        pipe.load_lora_weights(str(adapter), adapter_name=ADAPTER_NAME)
    except Exception as exc:
        result["applies"] = False
        result["error"] = _error(exc)
        # A failed load must not leave the base half-patched.
        result["base_bit_exact_after_failed_load"] = bool(
            np.array_equal(_images(pipe, LORA_PROMPTS, SEEDS), base)
        )
        return result
    result["applies"] = True
    result["load_lora_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        with_lora = _images(pipe, LORA_PROMPTS, SEEDS)
    except Exception as exc:  # it loads, but the forward with it fails
        result["forward_error"] = _error(exc)
        pipe.unload_lora_weights()
        result["base_bit_exact_unloaded"] = bool(
            np.array_equal(_images(pipe, LORA_PROMPTS, SEEDS), base)
        )
        return result
    result["seconds_per_image_lora"] = (time.perf_counter() - t) / len(with_lora)
    result["output_changes"] = not bool(np.array_equal(with_lora, base))
    result["mean_abs_diff_vs_base"] = float(np.mean(np.abs(with_lora - base)) * 255)
    result["orange_adherence_with"] = _adherence(with_lora, LORA_PROMPTS, SEEDS)
    # The six trained colors with the adapter on (seed 0: the known prompts must survive).
    result["base_prompt_adherence_with"] = _adherence(_images(pipe, PROMPTS, [0]), PROMPTS, [0])
    pipe.disable_lora()
    result["base_bit_exact_disabled"] = bool(
        np.array_equal(_images(pipe, LORA_PROMPTS, SEEDS), base)
    )
    pipe.enable_lora()
    result["lora_again_after_enable"] = bool(
        np.array_equal(_images(pipe, LORA_PROMPTS, SEEDS), with_lora)
    )
    pipe.unload_lora_weights()
    result["base_bit_exact_unloaded"] = bool(
        np.array_equal(_images(pipe, LORA_PROMPTS, SEEDS), base)
    )
    result["slot"] = _slot_cell(loaded, adapter, base)
    return result


def _slot_cell(loaded: Any, adapter: Path, base: Any) -> dict[str, Any]:
    """The same checks through what the server runs: `pipelines.lora` (declared adapter,
    hot-swap slot, activate / deactivate per batch)."""
    import numpy as np

    from examples.demo.train_lora import LORA_PROMPTS
    from pipelines.lora import LoraSpec, activate, load_adapters

    out: dict[str, Any] = {}
    t = time.perf_counter()
    try:
        lora = load_adapters(loaded, [LoraSpec(ADAPTER_NAME, str(adapter))])
    except Exception as exc:
        return {"applies": False, "error": _error(exc)}
    out["applies"] = True
    out["load_seconds"] = time.perf_counter() - t
    out["bit_exact_after_load"] = bool(
        np.array_equal(_images(loaded.pipeline, LORA_PROMPTS, SEEDS), base)
    )
    activate(loaded, ((ADAPTER_NAME, 1.0),))
    out["switch_seconds"] = lora.last_switch_seconds if lora else None
    t = time.perf_counter()
    images = _images(loaded.pipeline, LORA_PROMPTS, SEEDS)
    out["seconds_per_image"] = (time.perf_counter() - t) / len(images)
    out["orange_adherence_with"] = _adherence(images, LORA_PROMPTS, SEEDS)
    activate(loaded, ())
    out["bit_exact_deactivated"] = bool(
        np.array_equal(_images(loaded.pipeline, LORA_PROMPTS, SEEDS), base)
    )
    out["adapter_bytes"] = lora.nbytes if lora else 0
    return out


# -- the parent ------------------------------------------------------------------------
def _spawn(settings: Any, work: Path, adapter: Path) -> dict[str, Any]:
    variant = (settings.quant_backend, settings.quant_type)
    cid = cell_id(variant)
    settings_path = work / f"{cid}.settings.json"
    result_path = work / f"{cid}.json"
    write_json(settings_path, settings.model_dump(mode="json"))
    argv = [sys.executable, "-m", "benchmarks.lora", "--cell", cid, "--work", str(work)]
    argv += ["--settings", str(settings_path), "--adapter", str(adapter)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "backend": variant[0],
            "quant_type": variant[1],
            "measured": False,
            "error": " | ".join(tail),
        }
    data = dict(json.loads(result_path.read_text()))
    data["cell_seconds"] = time.perf_counter() - start
    return data


def measure_matrix(work: Path, adapter: Path, only: list[Variant] | None) -> list[dict[str, Any]]:
    runnable, skipped = registry_variants()
    cells: list[dict[str, Any]] = []
    for variant in only or runnable:
        settings = prepared_settings(variant, work, device="cpu")
        print(f"lora cell {cell_id(variant)} ...", flush=True)
        cells.append(_spawn(settings, work, adapter))
        print(f"  {cells[-1]}", flush=True)
    if only is None:
        for (backend, qtype), why in skipped.items():
            cells.append(
                {"backend": backend, "quant_type": qtype, "measured": False, "unavailable": why}
            )
    return cells


def _yes(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "**no**"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


def matrix_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        name = f"{c['backend']} {c['quant_type'] or ''}".strip()
        if not c.get("measured"):
            why = c.get("unavailable") or c.get("error", "")
            rows.append([name, "not measured here: " + str(why).replace("|", "/")] + ["-"] * 7)
            continue
        if c.get("forward_error"):
            rows.append(
                [
                    name,
                    "yes, but the forward with it fails: "
                    + str(c["forward_error"]).replace("|", "/"),
                    "-",
                    f"- / {_pct(c.get('orange_adherence_without'))}",
                    "-",
                    "-",
                    _yes(c.get("base_bit_exact_unloaded")),
                    "refused at start-up",
                ]
            )
            continue
        if not c.get("applies"):
            restored = c.get("base_bit_exact_after_failed_load")
            rows.append(
                [
                    name,
                    "**no**: " + str(c.get("error", "")).replace("|", "/"),
                    "-",
                    f"- / {_pct(c.get('orange_adherence_without'))}",
                    "-",
                    "-",
                    f"after the failed load: {_yes(restored)}",
                    "refused at start-up",
                ]
            )
            continue
        rows.append(
            [
                name,
                "yes",
                _yes(c.get("output_changes")),
                f"{_pct(c.get('orange_adherence_with'))} / "
                f"{_pct(c.get('orange_adherence_without'))}",
                _pct(c.get("base_prompt_adherence_with")),
                _yes(c.get("base_bit_exact_disabled")),
                _yes(c.get("base_bit_exact_unloaded")),
                _slot_summary(c.get("slot")),
            ]
        )
    return rows


def _slot_summary(slot: dict[str, Any] | None) -> str:
    if not slot:
        return "-"
    if not slot.get("applies"):
        return "**no**: " + str(slot.get("error", "")).replace("|", "/")
    exact = slot.get("bit_exact_after_load") and slot.get("bit_exact_deactivated")
    return f"{_pct(slot.get('orange_adherence_with'))} / {_yes(exact)}"


MATRIX_HEADER = [
    "backend",
    "load_lora_weights applies",
    "output changes",
    "orange adherence with / without",
    "known colors with adapter",
    "bit-exact base, adapter disabled",
    "bit-exact base, unloaded",
    "qdserve slot: orange with / bit-exact off",
]


def render(data: dict[str, Any]) -> str:
    parts = ["# LoRA adapters on quantized bases (CPU, demo model)"]
    if m := data.get("matrix"):
        parts += [
            "## Which backends take a LoRA",
            meta_line(m["meta"]) + f" Also: {_versions_note(m)}.",
            f"Adapter: `{m['adapter']}` (the demo LoRA, `examples/demo/train_lora.py`: teaches "
            "the color orange). Each cell in its own process: load through qdserve's loader, "
            f"generate the {m['prompts']} orange prompts x seeds {m['seeds']} ({STEPS} steps), "
            "`load_lora_weights`, generate again, `disable_lora()`, `enable_lora()`, "
            "`unload_lora_weights()`. Adherence: the demo checker (`pipelines/demo_checker.py`) "
            "sees an orange shape of the prompted kind and place; known colors: the 21 quality "
            "prompts (six trained colors), seed 0, with the adapter on. Bit-exact: the float "
            "output arrays equal the base run's (`numpy.array_equal`).",
            md_table(MATRIX_HEADER, matrix_rows(m["cells"])),
            *[
                f"Re-run since: {', '.join(r['cells'])}, by `{r['meta']['command']}` on "
                f"{r['meta']['date']} (git {r['meta']['git_commit']})."
                for r in m.get("reruns", [])
            ],
        ]
    if s := data.get("switching"):
        parts += [render_switching(s)]
    return "\n\n".join(parts) + "\n"


# -- switching adapters between consecutive requests ---------------------------------------
# (first request, second request) pairs; the second one's latency is the measurement, and the
# adapter set changes between them (a switch) or not.
PAIRS: list[tuple[str, str]] = [
    ("none", "none"),
    ("orange", "orange"),
    ("orange", "orange_b"),
    ("none", "orange"),
    ("orange", "none"),
]


def _selection(name: str) -> tuple[tuple[str, float], ...]:
    return () if name == "none" else ((name, 1.0),)


def measure_switching(rounds: int, compile_blocks: bool) -> dict[str, Any]:
    """Consecutive requests through `pipelines.generate.generate` (what the engine runs
    per batch: activate the batch's adapters, then denoise) on the embedded demo model."""
    import statistics

    import torch

    torch.set_num_threads(TORCH_THREADS)
    from pipelines.generate import GenerationRequest, generate
    from pipelines.generate import warm_up_lora as warm_up
    from pipelines.loader import load_pipeline
    from pipelines.lora import LoraSpec, adapters_of, attach
    from quantization.settings import QuantSettings

    loaded = load_pipeline(QuantSettings(quant_backend="none", device="cpu"))
    # The demo adapter declared twice: two adapters to switch between, same cost as two files.
    specs = [LoraSpec("orange", str(ADAPTER)), LoraSpec("orange_b", str(ADAPTER))]
    attach(loaded, specs, required=True)
    lora = adapters_of(loaded)
    assert lora is not None
    size = loaded.defaults.size
    counters: dict[str, Any] = {}
    if compile_blocks:
        from torch._dynamo.utils import counters as dynamo_counters

        from engine.core import compile_denoiser

        compile_denoiser(loaded)
        counters = dynamo_counters

    def run(name: str) -> tuple[float, float, float]:
        req = GenerationRequest(
            "an orange circle on the left",
            seed=0,
            num_inference_steps=STEPS,
            width=size,
            height=size,
            lora=_selection(name),
        )
        switches = lora.switches
        t = time.perf_counter()
        result = generate(loaded, req)
        total = time.perf_counter() - t
        switched = lora.last_switch_seconds if lora.switches != switches else 0.0
        return total, switched, result.timings["step_seconds_mean"]

    # Warm-up: every adapter state once (compiled: both graphs of every block).
    for name in ("none", "orange", "orange_b", "none"):
        run(name)
    if compile_blocks:
        warm_up(loaded, [(size, size)])
    graphs_before = sum(counters.get("stats", {}).values()) if compile_blocks else None
    frames_before = dict(counters.get("frames", {})) if compile_blocks else {}
    samples: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in PAIRS}
    switch_costs: list[float] = []
    step_times: list[float] = []
    for _ in range(rounds):
        for first, second in PAIRS:
            run(first)
            total, switched, step = run(second)
            samples[f"{first}->{second}"].append(total)
            step_times.append(step)
            if switched:
                switch_costs.append(switched)
    out: dict[str, Any] = {
        "rounds": rounds,
        "steps": STEPS,
        "size": size,
        "compiled": compile_blocks,
        "slot_rank": lora.rank,
        "adapter_bytes": lora.nbytes,
        "request_seconds_median": {k: statistics.median(v) for k, v in samples.items()},
        "request_seconds_p25_p75": {
            k: [float(q) for q in _quartiles(v)] for k, v in samples.items()
        },
        "switch_seconds_median": statistics.median(switch_costs),
        "switch_seconds_max": max(switch_costs),
        "switches": len(switch_costs),
        "step_seconds_median": statistics.median(step_times),
    }
    if compile_blocks:
        frames_after = dict(counters.get("frames", {}))
        out["dynamo_frames_before_after"] = [frames_before, frames_after]
        out["dynamo_stats_total_before_after"] = [
            graphs_before,
            sum(counters.get("stats", {}).values()),
        ]
        out["recompiles_during_switching"] = frames_after.get("total", 0) - frames_before.get(
            "total", 0
        )
    return out


def _quartiles(values: list[float]) -> tuple[float, float]:
    from benchmarks.common import percentile

    return percentile(values, 25), percentile(values, 75)


def render_switching(s: dict[str, Any]) -> str:
    parts = ["## Switching adapters between requests", meta_line(s["meta"])]
    for run in s["runs"]:
        med = run["request_seconds_median"]
        q = run["request_seconds_p25_p75"]
        step = run["step_seconds_median"]
        rows = [
            [
                pair.replace("->", " → "),
                f"{med[pair] * 1000:.1f}",
                f"{q[pair][0] * 1000:.1f}–{q[pair][1] * 1000:.1f}",
                f"{(med[pair] / med['none->none'] - 1) * 100:+.1f}%",
            ]
            for pair in med
        ]
        title = "compiled blocks (QDS_COMPILE)" if run["compiled"] else "eager"
        lines = [
            f"### {title}",
            f"Embedded demo model, {run['size']}x{run['size']}, {run['steps']} steps, one "
            f"image per request, {run['rounds']} interleaved rounds; the demo adapter declared "
            f"twice (`orange`, `orange_b`), slot rank {run['slot_rank']}, adapters + slot "
            f"{run['adapter_bytes'] / 1e6:.2f} MB. Latency of the second of two consecutive "
            "`generate()` calls (what the engine runs per batch: activate its adapters, "
            "denoise, decode).",
            md_table(["requests", "median ms", "IQR ms", "vs none → none"], rows),
            f"One switch (copying the new set into the slot, or turning it off): median "
            f"{run['switch_seconds_median'] * 1000:.2f} ms, max "
            f"{run['switch_seconds_max'] * 1000:.2f} ms over {run['switches']} switches; one "
            f"denoising step: median {step * 1000:.1f} ms, so a switch costs "
            f"{run['switch_seconds_median'] / step:.3f} of a step.",
        ]
        if run["compiled"]:
            lines.append(
                "Recompilations during the switching rounds (torch._dynamo frame counter): "
                f"{run['recompiles_during_switching']}."
            )
        parts.append("\n\n".join(lines))
    return "\n\n".join(parts)


def quality_section(matrix: dict[str, Any]) -> str:
    """docs/quality.md's LoRA section (between the quality report's kept markers)."""
    from examples.demo.quality import SECTION_BEGIN, SECTION_END

    rows = []
    for c in matrix["cells"]:
        name = f"{c['backend']}:{c['quant_type']}" if c.get("quant_type") else c["backend"]
        if not c.get("measured"):
            why = str(c.get("unavailable") or c.get("error", "")).replace("|", "/")
            rows.append([name, "-", "-", "-", "-", f"not measured here: {why}"])
        elif c.get("forward_error"):
            error = str(c["forward_error"]).replace("|", "/")
            without = _pct(c.get("orange_adherence_without"))
            rows.append([name, "-", without, "-", "-", f"loads, forward fails: {error}"])
        elif not c.get("applies"):
            error = str(c.get("error", "")).replace("|", "/")
            without = _pct(c.get("orange_adherence_without"))
            rows.append([name, "-", without, "-", "-", f"LoRA does not load: {error}"])
        else:
            slot = c.get("slot") or {}
            exact = c.get("base_bit_exact_disabled") and slot.get("bit_exact_deactivated")
            rows.append(
                [
                    name,
                    _pct(c.get("orange_adherence_with")),
                    _pct(c.get("orange_adherence_without")),
                    _pct(c.get("base_prompt_adherence_with")),
                    _yes(exact),
                    "",
                ]
            )
    header = [
        "backend",
        "orange, with the adapter",
        "orange, without",
        "known colors, with the adapter",
        "base bit-exact, adapter off",
        "note",
    ]
    body = "\n\n".join(
        [
            "## The demo LoRA per backend",
            meta_line(matrix["meta"]) + f" Also: {_versions_note(matrix)}.",
            f"The demo LoRA (`{matrix['adapter']}`, `examples/demo/train_lora.py`) teaches the "
            "demo model a color it never saw, orange. Adherence: the checker sees the prompted "
            f"shape, in orange, at the prompted place, over the {matrix['prompts']} orange "
            f"prompts x seeds {matrix['seeds']} ({matrix['steps']} steps); known colors: the "
            "21 prompts above (six trained colors), seed 0, with the adapter on; bit-exact: "
            "with the adapter disabled (diffusers) and with qdserve's slot turned off, the "
            "float outputs equal the base run's. Full matrix and method: "
            "docs/benchmarks/lora.md.",
            md_table(header, rows),
            *[
                f"Re-run since: {', '.join(r['cells'])} ({r['meta']['date']}, git "
                f"{r['meta']['git_commit']})."
                for r in matrix.get("reruns", [])
            ],
        ]
    )
    return f"{SECTION_BEGIN}\n{body}\n{SECTION_END}"


def write_quality_section(md_path: Path, matrix: dict[str, Any]) -> None:
    """Put the section into docs/quality.md, replacing an earlier one."""
    from examples.demo.quality import SECTION_BEGIN, SECTION_END

    replace_section(md_path, quality_section(matrix), SECTION_BEGIN, SECTION_END)


def _lora_versions() -> dict[str, str | None]:
    """Versions the shared meta line leaves out and the LoRA cells depend on."""
    from quantization.environment import library_version

    return {name: library_version(name) for name in ("peft", "sdnq")}


def _versions_note(matrix: dict[str, Any]) -> str:
    versions = matrix.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def _load_existing(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "lora.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def main(argv: list[str], out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    import tempfile

    p = argparse.ArgumentParser(prog="qdserve bench lora", description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma list of backend:quant_type (default: all)")
    p.add_argument("--adapter", type=Path, default=ADAPTER)
    p.add_argument("--out", type=Path, default=out_dir)
    p.add_argument(
        "--switching",
        action="store_true",
        help="measure switching adapters between requests instead of the backend matrix",
    )
    p.add_argument("--rounds", type=int, default=20, help="switching rounds")
    p.add_argument("--compile", action="store_true", help="switching: also with compiled blocks")
    p.add_argument(
        "--quality-md",
        type=Path,
        default=REPO / "docs" / "quality.md",
        help="the full matrix also writes its LoRA section there",
    )
    args = p.parse_args(argv)
    command = "python -m benchmarks.lora" + (f" {' '.join(argv)}" if argv else "")
    data = _load_existing(args.out)
    if args.switching:
        meta = run_meta(command)
        runs = [measure_switching(args.rounds, False)]
        if args.compile:
            runs.append(measure_switching(args.rounds, True))
        data["switching"] = {"meta": meta, "runs": runs}
    else:
        only = [parse_variant(v) for v in args.only.split(",") if v] or None
        with tempfile.TemporaryDirectory(prefix="qds-lora-") as tmp:
            meta = run_meta(command)
            cells = measure_matrix(Path(tmp), args.adapter, only)
        from examples.demo.train_lora import LORA_PROMPTS

        adapter = args.adapter.resolve()
        previous = data.get("matrix")
        if only is not None and previous:
            # A re-run of some cells: they replace theirs in the full matrix.
            ids = {cell_id((c["backend"], c["quant_type"])) for c in cells}
            kept = [
                c for c in previous["cells"] if cell_id((c["backend"], c["quant_type"])) not in ids
            ]
            order = {
                cell_id((c["backend"], c["quant_type"])): i for i, c in enumerate(previous["cells"])
            }
            merged = sorted(
                kept + cells,
                key=lambda c: order.get(cell_id((c["backend"], c["quant_type"])), len(order)),
            )
            previous["cells"] = merged
            previous.setdefault("reruns", []).append({"meta": meta, "cells": sorted(ids)})
            data["matrix"] = previous
            if args.quality_md is not None:
                write_quality_section(args.quality_md, previous)
        else:
            data["matrix"] = {
                "meta": meta,
                "adapter": str(
                    adapter.relative_to(REPO) if adapter.is_relative_to(REPO) else adapter
                ),
                "prompts": len(LORA_PROMPTS),
                "seeds": SEEDS,
                "steps": STEPS,
                "cells": cells,
                "versions": _lora_versions(),
            }
            if only is None and args.quality_md is not None:
                write_quality_section(args.quality_md, data["matrix"])
    data["headline"] = headline(data)
    write_json(args.out / "lora.json", data)
    (args.out / "lora.md").write_text(render(data))
    return data


def headline(data: dict[str, Any]) -> str:
    """The index line: which measured variants take the LoRA, and what a switch costs."""
    parts = []
    if m := data.get("matrix"):
        measured = [c for c in m["cells"] if c.get("measured")]
        ok = [c for c in measured if c.get("applies") and not c.get("forward_error")]
        refused = sorted({c["backend"] for c in measured if c not in ok})
        parts.append(
            f"{len(ok)} of {len(measured)} CPU variants take the demo LoRA"
            + (f" (not all of: {', '.join(refused)})" if refused else "")
        )
    if s := data.get("switching"):
        run = s["runs"][0]
        parts.append(
            f"a switch {run['switch_seconds_median'] * 1000:.1f} ms = "
            f"{run['switch_seconds_median'] / run['step_seconds_median']:.3f} of a step"
        )
    return "; ".join(parts)


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cell", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--settings", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    args = p.parse_args(argv)
    from quantization.settings import QuantSettings

    settings = QuantSettings(**json.loads(args.settings.read_text()))
    write_json(args.work / f"{args.cell}.json", run_cell(settings, args.adapter))
    return 0


if __name__ == "__main__":
    if "--cell" in sys.argv:
        sys.exit(_child(sys.argv[1:]))
    main(sys.argv[1:])
    sys.exit(0)
