"""`qdserve bench batch-size`: images per second against batch size, in process, no HTTP.

Where `QDS_MAX_BATCH=auto` gets its CPU value: the demo model (or `--variant`) at torch's
default thread count, both ways the service can batch it, interleaved round by round so drift
on shared CPUs hits every size alike:

- `generate_batch`: one whole pipeline call for the batch (what LitServe's peer server runs);
- `StepBatch`: the engine's step loop (`pipelines.stepping`), prompt embeddings cached as
  the engine caches them;
- `StepBatch x2 lanes`: the engine with `QDS_ENGINE_LANES=2` (its CPU default): the batch as two
  step batches stepped at the same time, each on a lane thread with half the torch threads
  (`engine.lanes`); a batch of 1 runs alone, as in the engine.

A batch pays off while it amortizes per-operation overhead; past the size where the matmuls
fill the cores, images per second stop rising (and latency keeps growing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROMPT,
    fmt,
    md_table,
    meta_line,
    parse_variant,
    prepared_settings,
    run_meta,
    write_json,
)
from service.settings import AUTO_LANES_CPU, AUTO_MAX_BATCH_CPU

SIZES = (1, 2, 4, 6, 8, 12, 16)
WAYS = ("generate_batch", "StepBatch", "StepBatch x2 lanes")


def parse(argv: Sequence[str], quick: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qdserve bench batch-size", description=__doc__)
    p.add_argument("--variant", default="none", help="backend:quant_type, e.g. quanto:int8")
    p.add_argument("--rounds", type=int, default=2 if quick else 7)
    p.add_argument("--sizes", default="1,4" if quick else ",".join(map(str, SIZES)))
    return p.parse_args(list(argv))


def runners(loaded: Any) -> dict[str, Callable[[int, int], None]]:
    from pipelines.generate import GenerationRequest, generate_batch, resolve
    from pipelines.prompt_cache import PromptCache
    from pipelines.stepping import StepBatch, supports_stepping

    def requests(batch: int, seed: int) -> list[GenerationRequest]:
        return [
            resolve(loaded.defaults, GenerationRequest(PROMPT, seed=seed + i)) for i in range(batch)
        ]

    def whole(batch: int, seed: int) -> None:
        generate_batch(loaded, requests(batch, seed))

    cache = PromptCache(64 * 2**20)

    def stepped(batch: int, seed: int) -> None:
        run = StepBatch(loaded, prompt_cache=cache, max_images=batch)
        run.add_many([(str(i), r) for i, r in enumerate(requests(batch, seed))])
        while len(run):
            run.step()

    def laned(batch: int, seed: int) -> None:
        from engine.lanes import Lanes

        reqs = requests(batch, seed)
        half = (batch + 1) // 2
        runs = []
        for lane, part in enumerate((reqs[:half], reqs[half:])):
            if part:
                run = StepBatch(loaded, prompt_cache=cache, max_images=len(part))
                run.add_many([(f"{lane}-{i}", r) for i, r in enumerate(part)])
                runs.append(run)
        while any(len(r) for r in runs):
            live = [r for r in runs if len(r)]
            if len(live) == 1:
                live[0].step()
                continue
            Lanes.get(2).run_or_raise([r.step for r in live])

    out = {"generate_batch": whole}
    if supports_stepping(loaded):
        out["StepBatch"] = stepped
        out["StepBatch x2 lanes"] = laned
    return out


def measure(variant: str, sizes: list[int], rounds: int, work: Path) -> dict[str, Any]:
    import torch

    from pipelines.loader import load_pipeline

    loaded = load_pipeline(prepared_settings(parse_variant(variant), work))
    ways = runners(loaded)
    per_image: dict[str, dict[int, list[float]]] = {w: {b: [] for b in sizes} for w in ways}
    for run in ways.values():  # untimed warm-up of every shape
        for b in sizes:
            run(b, 0)
    for rnd in range(rounds):
        for b in sizes if rnd % 2 == 0 else sizes[::-1]:
            for way, run in ways.items():
                t0 = time.perf_counter()
                run(b, 1000 * rnd)
                per_image[way][b].append((time.perf_counter() - t0) / b)
    rows: dict[str, dict[str, Any]] = {}
    for way, by_size in per_image.items():
        rows[way] = {
            str(b): {
                "images_per_second": 1 / statistics.median(v),
                "seconds_per_call_median": statistics.median(v) * b,
                "rounds": len(v),
            }
            for b, v in by_size.items()
        }
    best = {way: max(r, key=lambda b: r[b]["images_per_second"]) for way, r in rows.items()}
    return {
        "variant": variant,
        "torch_threads": torch.get_num_threads(),
        "size": f"{loaded.defaults.size}x{loaded.defaults.size}",
        "steps": loaded.defaults.steps,
        "rounds": rounds,
        "results": rows,
        "best_batch": best,
    }


def render(data: dict[str, Any]) -> str:
    sizes = list(next(iter(data["results"].values())))
    ways = list(data["results"])
    header = ["batch", *(f"{w} img/s" for w in ways), *(f"{w} ms/call" for w in ways)]
    rows = [
        [
            b,
            *(fmt(r[b]["images_per_second"], 2) for r in data["results"].values()),
            *(fmt(r[b]["seconds_per_call_median"] * 1e3, 0) for r in data["results"].values()),
        ]
        for b in sizes
    ]
    best = ", ".join(f"{w} {b}" for w, b in data["best_batch"].items())
    return (
        "\n\n".join(
            [
                f"# Images per second against batch size ({data['variant']})",
                meta_line(data["meta"]),
                f"In process, no HTTP: {data['size']}, {data['steps']} steps, "
                f"{data['torch_threads']} torch threads (torch's default), medians of "
                f"{data['rounds']} interleaved rounds. `generate_batch` is one pipeline call "
                "per batch (LitServe's peer server runs it); `StepBatch` is the engine's "
                "step loop with the prompt cache; `StepBatch x2 lanes` is that loop as the "
                "engine runs it with `QDS_ENGINE_LANES=2` (two half batches stepped at once, "
                "one lane thread each).",
                md_table(header, rows),
                f"Best batch: {best}. {auto_note(data)}",
            ]
        )
        + "\n"
    )


def auto_note(data: dict[str, Any]) -> str:
    """How `QDS_MAX_BATCH=auto` (8 per engine lane on CPU: 16 with the default 2 lanes) fares
    in this run, for the way the engine batches (lanes when measured)."""
    text = (
        f"`QDS_MAX_BATCH=auto` is {AUTO_MAX_BATCH_CPU} per engine lane on CPU, "
        f"{AUTO_MAX_BATCH_CPU * AUTO_LANES_CPU} with the default {AUTO_LANES_CPU} lanes "
        "(service/settings.py; on a GPU 4, not measured there)."
    )
    way = next((w for w in reversed(WAYS) if w in data["results"]), None)
    rows = data["results"].get(way, {}) if way else {}
    auto = AUTO_MAX_BATCH_CPU * (AUTO_LANES_CPU if way == WAYS[-1] else 1)
    if str(auto) not in rows:
        return text
    at_auto = rows[str(auto)]["images_per_second"]
    best = rows[data["best_batch"][way]]["images_per_second"]
    return (
        f"{text} In this run `{way}` gives {fmt(at_auto, 2)} img/s at "
        f"{auto}, {fmt(100 * (1 - at_auto / best), 0)}% under its best "
        f"({data['best_batch'][way]}); a larger batch also makes each request wait longer."
    )


def main(argv: Sequence[str], out: Path, quick: bool) -> dict[str, Any]:
    args = parse(argv, quick)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    command = " ".join(["qdserve bench batch-size", *(["--quick"] if quick else []), *argv])
    import torch

    meta = run_meta(command, torch_threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="qds-batch-size-") as tmp:
        data = {"meta": meta, **measure(args.variant, sizes, args.rounds, Path(tmp))}
    data["headline"] = "best batch: " + ", ".join(
        f"{w} {b} ({fmt(data['results'][w][b]['images_per_second'], 2)} img/s vs "
        f"{fmt(data['results'][w].get('4', {}).get('images_per_second'), 2)} at 4)"
        for w, b in data["best_batch"].items()
    )
    # A --variant run gets its own files (batch-size-quanto-int8.md), never the default's.
    backend, qtype = parse_variant(args.variant)
    slug = "-".join(["batch-size", *(p for p in (backend, qtype) if p and backend != "none")])
    slug = slug.replace("_", "-")
    write_json(out / f"{slug}.json", data)
    (out / f"{slug}.md").write_text(render(data))
    return data
