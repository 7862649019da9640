"""docs/benchmarks/gpu.md: the recorded GPU runs (gpu-h200-run*/) next to published anchors.

The GPU numbers come from `benchmarks/gpu.py` runs kept in docs/benchmarks/gpu-h200-run*/
(JSON + card.txt); this only renders them. The anchors are the published H100 numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, md_table, run_meta, write_json

ANCHOR_SOURCE = (
    'Hugging Face blog "Exploring Quantization Backends in Diffusers" '
    "(https://huggingface.co/blog/diffusers-quantization), FLUX.1-dev full pipeline, 1024x1024, "
    "50 steps, H100 80GB; as restated in ../shared/design.md (Published anchors)"
)
# setting -> (our case key, memory after load GB, peak GB, seconds for 50 steps)
ANCHORS: list[tuple[str, str, float, float, float]] = [
    ("bf16", "none:-", 31.4, 36.2, 12),
    ("bnb nf4", "bitsandbytes_4bit:nf4", 12.6, 17.3, 12),
    ("bnb 8-bit", "bitsandbytes_8bit:int8", 19.3, 24.4, 27),
    ("torchao int8wo", "torchao:int8wo", 17.0, 21.5, 15),
    ("torchao int4wo", "torchao:int4wo", 10.6, 14.7, 109),
    ("quanto int8", "quanto:int8", 17.3, 21.8, 15),
    ("GGUF Q8_0", "gguf:Q8_0", 21.5, 26.0, 15),
    ("GGUF Q4_1", "gguf:Q4_1", 16.8, 21.3, 23),
]
STEPS = 50
GB = 1e9


def _card(folder: Path) -> str:
    path = folder / "card.txt"
    if not path.exists():
        return "unknown"
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("name,") and "," in line:
            return line.strip()
    return "unknown"


def collect(bench_dir: Path) -> list[dict[str, Any]]:
    """Every recorded run file, oldest first: run folder, file, card, JSON."""
    runs = []
    for folder in sorted(p for p in bench_dir.glob("gpu-h200-run*") if p.is_dir()):
        for path in sorted(folder.glob("gpu_bench*.json")):
            runs.append(
                {
                    "run": f"{folder.name}/{path.name}",
                    "card": _card(folder),
                    "data": json.loads(path.read_text()),
                }
            )
    return runs


def merge(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[str, dict[str, Any]]]]]:
    """arch -> case -> [(run, result)] in run order."""
    out: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for run in runs:
        for arch, a in run["data"].get("archs", {}).items():
            for case, result in a.get("cases", {}).items():
                out.setdefault(arch, {}).setdefault(case, []).append((run["run"], result))
    return out


def _latest_ok(entries: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]] | None:
    ok = [(r, d) for r, d in entries if "error" not in d]
    return ok[-1] if ok else None


def _ours(entries: list[tuple[str, dict[str, Any]]] | None) -> list[str]:
    if not entries:
        return ["not in any recorded run", "-", "-", "-", "-", "-"]
    best = _latest_ok(entries)
    if best is None:
        return ["failed (below)", "-", "-", "-", "-", entries[-1][0]]
    run, d = best
    step = d["seconds_per_step_median"]
    return [
        fmt(d["gpu_allocated_after_load_bytes"] / GB, 2),
        fmt(d["peak_bytes"] / GB, 2),
        fmt(step, 4),
        fmt(step * STEPS, 1),
        fmt(d.get("ratio_storage_vs_bf16"), 3),
        run,
    ]


def render(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    merged = merge(runs)
    cards = sorted({r["card"] for r in runs})
    versions = sorted(
        {f"torch {r['data'].get('torch')}, diffusers {r['data'].get('diffusers')}" for r in runs}
    )
    dates = [r["data"].get("date") for r in runs]
    parts = [
        "# GPU: real-size denoisers on an NVIDIA H200, next to the published H100 numbers",
        f"Rendered by `{meta['command']}` on {meta['date']} (git {meta['git_commit']}) from the "
        f"recorded runs below; every GPU number is read from their JSON.",
        f"Card (card.txt: name, memory, driver, compute capability): {'; '.join(cards)}. "
        f"Software on the GPU machine: {'; '.join(versions)}. Runs: "
        + ", ".join(f"`{r['run']}` ({r['data'].get('date')})" for r in runs)
        + f". Dates {dates[0]} .. {dates[-1]}."
        if dates
        else "",
        "**Read this before comparing.** Our GPU numbers are the **denoiser only** (the "
        "transformer, random weights from the published config, loaded through each backend): "
        "no text encoders and no VAE, which the published numbers include (T5-XXL in bf16 alone "
        "is about 9.5 GB). Our time is **seconds per denoiser step** at 1024x1024 (median of "
        "the timed steps after one warm-up step); multiply by 50 for the published 50-step "
        "time (the x50 column), which also includes text encoding and VAE decode. Memory is "
        "`torch.cuda` allocated bytes after load and the peak during the steps (GB = 1e9 "
        "bytes). The card is an H200, the anchors an H100: same Hopper generation (sm_90), "
        "the H200 has more and faster memory.",
        f"Anchors: {ANCHOR_SOURCE}.",
    ]
    flux = merged.get("flux-dev", {})
    rows = []
    anchored = set()
    for setting, key, load_gb, peak_gb, secs in ANCHORS:
        anchored.add(key)
        rows.append(
            [setting, fmt(load_gb, 1), fmt(peak_gb, 1), fmt(secs, 0), *_ours(flux.get(key))]
        )
    for key, entries in flux.items():
        if key not in anchored:
            rows.append([key + " (no anchor)", "-", "-", "-", *_ours(entries)])
    header = [
        "setting",
        "published: after load GB",
        "published: peak GB",
        "published: s / 50 steps",
        "ours: after load GB",
        "ours: peak GB",
        "ours: s / step",
        "ours: x50 s",
        "ours: storage / bf16",
        "ours: run",
    ]
    parts += ["## FLUX.1-dev transformer (11.9 B parameters)", md_table(header, rows)]
    for arch, cases in merged.items():
        if arch == "flux-dev":
            continue
        arows = [[key, *_ours(entries)] for key, entries in cases.items()]
        parts += [
            f"## {arch} transformer (no published anchor)",
            md_table(["case", *header[4:]], arows),
        ]
    failures = []
    for arch, cases in merged.items():
        for key, entries in cases.items():
            later_ok = _latest_ok(entries)
            for run, d in entries:
                if "error" in d:
                    note = ""
                    if later_ok is not None and later_ok[0] > run:
                        note = f" (measured successfully later, in `{later_ok[0]}`)"
                    error = str(d["error"]).replace("\n", " ")[:400]
                    failures.append(f"- {arch} `{key}` in `{run}`: `{error}`{note}")
    parts += [
        "## Failures recorded in the JSON (as raised)",
        "\n".join(failures) if failures else "none",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def main(out: Path) -> dict[str, Any]:
    runs = collect(out)
    meta = run_meta("qdserve bench gpu-report")
    if not runs:
        raise FileNotFoundError(f"no gpu-h200-run*/gpu_bench*.json under {out}")
    text = render(runs, meta)
    (out / "gpu.md").write_text(text)
    merged = merge(runs)
    summary = {
        "meta": meta,
        "source_runs": [r["run"] for r in runs],
        "anchors": {"source": ANCHOR_SOURCE, "rows": ANCHORS},
        "headline": _headline(merged),
    }
    write_json(out / "gpu.json", summary)
    return summary


def _headline(merged: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]]) -> str:
    flux = merged.get("flux-dev", {})
    parts = []
    for key in ("none:-", "bitsandbytes_4bit:nf4", "torchao:int8wo", "quanto:int8"):
        best = _latest_ok(flux.get(key, []))
        if best:
            d = best[1]
            parts.append(
                f"{key} {d['gpu_allocated_after_load_bytes'] / GB:.1f} GB, "
                f"{d['seconds_per_step_median']:.3f} s/step"
            )
    return "H200, Flux-dev denoiser only: " + "; ".join(parts)
