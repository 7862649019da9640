"""`qdserve bench step-cache`: step caching (QDS_STEP_CACHE / the `step_cache` field) as served.

One real qdserve server (its defaults: compiled on a CPU with a C++ compiler; QDS_STEP_CACHE
set so the warm-up also compiles the split forward), every setting asked per request through
the `step_cache` field, so the settings differ in nothing else. Per step count (28, 50):

- throughput: images per second at concurrency 1 and 16, settings interleaved (order
  alternating per round), the same request shapes and seeds for every setting;
- quality: the demo prompt set at one seed, sent 16 at a time (so samples join running
  batches at different steps), each image against the uncached image of the same prompt and
  seed: PSNR (dB) and the demo checker's prompt adherence (`pipelines.demo_checker`);
- the server's own count of skipped block runs (`qds_step_cache_blocks_total`).

Writes docs/benchmarks/step-cache.{json,md} and the step-cache section of docs/quality.md.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    fetch_images,
    fmt,
    md_table,
    meta_line,
    psnr,
    qdserve_server,
    replace_section,
    run_load,
    run_meta,
    write_json,
)
from service.settings import DEFAULT_STEP_CACHE

GEN_PATH = "/v1/images/generations"
SETTINGS = [
    "off",
    "fbcache:0.1",
    "fbcache:0.2",
    "fbcache:0.3",
    "fbcache:0.5",
    "taylorseer:2",
    "taylorseer:3",
    "taylorseer:4",
    "taylorseer:6",
]
STEPS = (28, 50)
LEVELS = ((1, 5), (16, 16))  # (concurrency, requests per round)
ROUNDS = 4
QUALITY_SEED = 0
SIZE = 32
SECTION_BEGIN = "<!-- step-cache:begin -->"
SECTION_END = "<!-- step-cache:end -->"
NOTE = (
    "Measured on a shared 2-core CPU machine (other engineers' jobs ran at the same time: "
    "see the load average); ratios between settings measured in the same interleaved rounds "
    "are the figures to read, absolute img/s move with the machine's load."
)


def _body(prompt: str, seed: int, steps: int, cache: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "size": f"{SIZE}x{SIZE}",
        "seed": seed,
        "num_inference_steps": steps,
        "step_cache": cache,
        "response_format": "b64_json",
        "output_format": "png",
    }


def _blocks(url: str) -> dict[str, float]:
    """qds_step_cache_blocks_total by outcome, from /metrics."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"computed": 0.0, "skipped": 0.0}
    for outcome, value in re.findall(
        r'^qds_step_cache_blocks_total\{outcome="(\w+)"\} (\S+)$', text, re.M
    ):
        out[outcome] = float(value)
    return out


def throughput(url: str, steps: int, quick: bool) -> dict[str, Any]:
    levels = ((1, 2), (16, 16)) if quick else LEVELS
    rounds = 1 if quick else ROUNDS
    out: dict[str, Any] = {s: {} for s in SETTINGS}
    seed = 1000
    for conc, total in levels:
        per: dict[str, list[Any]] = {s: [] for s in SETTINGS}
        blocks: dict[str, dict[str, float]] = {
            s: {"computed": 0.0, "skipped": 0.0} for s in SETTINGS
        }
        for rnd in range(rounds):
            order = SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]
            for cache in order:

                def body(i: int, base: int = seed, cache: str = cache) -> dict[str, Any]:
                    return _body("a red circle on a blue square", base + i, steps, cache)

                run_load(url + GEN_PATH, body, conc, conc)  # warm the pool, untimed
                before = _blocks(url)
                per[cache].append(run_load(url + GEN_PATH, body, conc, total, max_seconds=600))
                after = _blocks(url)
                for k in ("computed", "skipped"):
                    blocks[cache][k] += after[k] - before[k]
            seed += total
        for cache in SETTINGS:
            results = per[cache]
            ok = sum(r.ok for r in results)
            wall = sum(r.wall_seconds for r in results)
            runs = blocks[cache]["computed"] + blocks[cache]["skipped"]
            out[cache][str(conc)] = {
                "requests": sum(r.requests for r in results),
                "ok": ok,
                "errors": sum(sum(r.errors.values()) for r in results),
                "wall_seconds": wall,
                "images_per_second": ok / wall if wall else None,
                "skipped_block_fraction": blocks[cache]["skipped"] / runs if runs else None,
            }
    for cache in SETTINGS:
        for conc in out[cache]:
            base = out["off"][conc]["images_per_second"]
            mine = out[cache][conc]["images_per_second"]
            out[cache][conc]["speedup_vs_off"] = mine / base if base and mine else None
    return out


def quality(url: str, steps: int, quick: bool) -> dict[str, Any]:
    from examples.demo.quality import PROMPTS
    from pipelines.demo_checker import adheres

    prompts = PROMPTS[:4] if quick else PROMPTS
    images: dict[str, list[Any]] = {}
    for cache in SETTINGS:
        bodies = [_body(p, QUALITY_SEED, steps, cache) for p in prompts]
        images[cache] = fetch_images(url + GEN_PATH, bodies, 16)
    out: dict[str, Any] = {}
    for cache in SETTINGS:
        psnrs = [psnr(a, b) for a, b in zip(images[cache], images["off"], strict=True)]
        finite = [p for p in psnrs if math.isfinite(p)]
        passed = sum(adheres(im, p) for im, p in zip(images[cache], prompts, strict=True))
        out[cache] = {
            "images": len(prompts),
            "adherence": passed / len(prompts),
            # Identical images (inf dB) count as 100 dB in the mean, listed apart.
            "psnr_mean_db": sum(min(p, 100.0) for p in psnrs) / len(psnrs),
            "psnr_min_db": min(psnrs),
            "identical": len(psnrs) - len(finite),
        }
    return out


def measure(out_dir: Path, quick: bool, log_dir: Path) -> dict[str, Any]:
    server = qdserve_server("qdserve-step-cache", log_dir, QDS_STEP_CACHE=DEFAULT_STEP_CACHE)
    try:
        start_seconds = server.start_seconds
        url = server.base_url
        runs: dict[str, Any] = {}
        for steps in STEPS[:1] if quick else STEPS:
            started = time.perf_counter()
            runs[str(steps)] = {
                "throughput": throughput(url, steps, quick),
                "quality": quality(url, steps, quick),
                "seconds": 0.0,
            }
            runs[str(steps)]["seconds"] = time.perf_counter() - started
    finally:
        server.stop()
    return {
        "settings": SETTINGS,
        "runs": runs,
        "server_start_seconds": start_seconds,
        "method": "one qdserve server at its defaults (compiled on this CPU) with "
        f"QDS_STEP_CACHE={DEFAULT_STEP_CACHE} (so the warm-up compiles the split forward); each "
        "setting asked per request with the `step_cache` field. Throughput: closed-loop clients, "
        f"{', '.join(f'{t} requests at concurrency {c}' for c, t in LEVELS)} per round, "
        f"{ROUNDS} rounds with the settings' order alternating, {SIZE}x{SIZE}, distinct seeds. "
        f"Quality: the demo prompt set at seed {QUALITY_SEED}, 16 requests at a time, against "
        "the uncached (`off`) image of the same prompt and seed from the same server. "
        "skipped_block_fraction: the server's qds_step_cache_blocks_total over the timed "
        "requests. " + NOTE,
    }


def _row(steps: str, cache: str, data: dict[str, Any]) -> list[str]:
    t = data["runs"][steps]["throughput"][cache]
    q = data["runs"][steps]["quality"][cache]
    off = data["runs"][steps]["quality"]["off"]["adherence"]
    return [
        steps,
        f"`{cache}`",
        fmt(t["1"]["images_per_second"], 2),
        fmt(t["1"]["speedup_vs_off"], 2) + "x",
        fmt(t["16"]["images_per_second"], 2),
        fmt(t["16"]["speedup_vs_off"], 2) + "x",
        fmt(t["16"]["skipped_block_fraction"], 2),
        f"{q['adherence'] * 100:.1f}% ({(q['adherence'] - off) * 100:+.1f})",
        "identical" if q["identical"] == q["images"] else fmt(q["psnr_mean_db"], 1),
        fmt(q["psnr_min_db"], 1),
    ]


HEADER = [
    "steps",
    "step_cache",
    "img/s c1",
    "vs off c1",
    "img/s c16",
    "vs off c16",
    "skipped block runs (c16)",
    "adherence (vs off, points)",
    "mean PSNR (dB)",
    "min PSNR (dB)",
]


def table(data: dict[str, Any]) -> str:
    rows = [_row(s, c, data) for s in data["runs"] for c in data["settings"]]
    return md_table(HEADER, rows)


GOAL_STEPS = "28"
GOAL_SPEEDUP = 1.6
GOAL_ADHERENCE_POINTS = 2.0
GOAL_PSNR_DB = 30.0


def goal_rows(data: dict[str, Any]) -> list[list[str]]:
    """Each cached setting at 28 steps against issue 26's goal, per concurrency."""
    run = data["runs"].get(GOAL_STEPS)
    if run is None:
        return []
    meta = data["meta"]
    where = f"{meta['machine']['cpu']}, {meta['machine']['logical_cpus']} CPUs (shared)"
    off = run["quality"]["off"]["adherence"]
    rows = []
    for cache in data["settings"][1:]:
        q = run["quality"][cache]
        points = (q["adherence"] - off) * 100
        quality_ok = abs(points) <= GOAL_ADHERENCE_POINTS and q["psnr_mean_db"] >= GOAL_PSNR_DB
        for conc in ("1", "16"):
            speed = run["throughput"][cache][conc]["speedup_vs_off"]
            met = quality_ok and speed is not None and speed >= GOAL_SPEEDUP
            rows.append(
                [
                    f"`{cache}`",
                    conc,
                    fmt(speed, 2) + "x",
                    f"{points:+.1f}",
                    fmt(q["psnr_mean_db"], 1),
                    "met" if met else "not met",
                    f"{where}, {meta['date']}, git {meta['git_commit']}",
                ]
            )
    return rows


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    goal = md_table(
        [
            "step_cache",
            "concurrency",
            "img/s vs off",
            "adherence (points)",
            "mean PSNR (dB)",
            "goal",
            "machine, date, commit",
        ],
        goal_rows(data),
    )
    parts = [
        "# Step caching as served (`qdserve bench step-cache`)",
        meta_line(meta),
        data["method"],
        table(data),
        f"Goal (issue 26): >= {GOAL_SPEEDUP}x img/s at {GOAL_STEPS} steps with adherence "
        f"within {GOAL_ADHERENCE_POINTS:g} points of uncached and mean PSNR >= "
        f"{GOAL_PSNR_DB:g} dB (one prompt of the set moves adherence by "
        f"{100 / max(1, data['runs'][GOAL_STEPS]['quality']['off']['images']):.1f} points).",
        goal,
    ]
    return "\n\n".join(parts) + "\n"


def headline(data: dict[str, Any], cache: str = DEFAULT_STEP_CACHE) -> str:
    """The default setting's row at 28 steps, for docs/benchmarks/README.md."""
    run = data["runs"].get(GOAL_STEPS)
    if run is None or cache not in run["throughput"]:
        return ""
    t, q = run["throughput"][cache], run["quality"][cache]
    points = (q["adherence"] - run["quality"]["off"]["adherence"]) * 100
    return (
        f"{cache} at {GOAL_STEPS} steps: x{fmt(t['1']['speedup_vs_off'], 2)} img/s at c1, "
        f"x{fmt(t['16']['speedup_vs_off'], 2)} at c16, adherence {points:+.1f} points, "
        f"mean PSNR {fmt(q['psnr_mean_db'], 1)} dB"
    )


def rerender(json_path: Path) -> None:
    """Rewrite a run's .md (and headline) from its .json (after a change to the rendering)."""
    import json

    data = json.loads(json_path.read_text())
    data["headline"] = headline(data)
    write_json(json_path, data)
    json_path.with_suffix(".md").write_text(render(data))


def quality_section(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        SECTION_BEGIN,
        "## Step caching (QDS_STEP_CACHE / `step_cache`)",
        "",
        f"From `qdserve bench step-cache` on {meta['date']} (git {meta['git_commit']}), "
        "the embedded demo model served by qdserve (compiled), 32x32: each image against the "
        "uncached image of the same prompt and seed; adherence by the demo checker; speed in "
        "docs/benchmarks/step-cache.md. " + NOTE,
        "",
        table(data),
        SECTION_END,
    ]
    return "\n".join(lines)


def write_quality_section(md_path: Path, data: dict[str, Any]) -> None:
    replace_section(md_path, quality_section(data), SECTION_BEGIN, SECTION_END)


def main(argv: list[str], out: Path, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qds-step-cache-") as tmp:
        meta = run_meta("qdserve bench step-cache" + (" --quick" if quick else ""))
        data = {"meta": meta, **measure(out, quick, Path(tmp))}
    data["headline"] = headline(data)
    write_json(out / "step-cache.json", data)
    (out / "step-cache.md").write_text(render(data))
    if not quick and out.resolve() == (REPO / "docs" / "benchmarks").resolve():
        write_quality_section(REPO / "docs" / "quality.md", data)
    return data
