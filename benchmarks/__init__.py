"""`qdserve bench <subcommand>`: CPU benchmarks and the GPU report, written to docs/benchmarks/.

Not part of the installed package: run from a qdserve checkout (`--out` picks another folder).

Subcommands: matrix, overhead, load, peer, batch-size, batching, compile, compile-serving,
gpu-report, streaming, quality, lora, faults (docs/reliability.md), step-cache, all. `all`
clears docs/benchmarks/ (keeping the recorded GPU runs, `gpu-h*-run*/`, `peer-nvidia-*`) and
regenerates everything.
Every output carries the machine, versions and date of the run that produced it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT

# Measured on a lent GPU, not reproducible on the CPU machines: `bench all` keeps them.
KEEP_PREFIX = ("gpu-h200-run", "gpu-h100-run", "peer-nvidia-")


def _matrix(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import matrix

    return matrix.main(argv, out, quick)


def _serving(name: str) -> Callable[[list[str], Path, bool], Any]:
    def run(argv: list[str], out: Path, quick: bool) -> Any:
        from benchmarks import serving

        return serving.main(name, out, quick)

    return run


def _peer(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import peer

    return peer.main(argv, out, quick)


def _batch_size(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import batch_size

    return batch_size.main(argv, out, quick)


def _compile(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import compiled

    return compiled.main(out, quick)


def _gpu_report(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import gpu_report

    return gpu_report.main(out)


def _streaming(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import streaming

    return streaming.run(out, quick)


def _quality(argv: list[str], out: Path, quick: bool) -> Any:
    # The demo model's quality report lives beside the model (docs/quality.md + PNG grid).
    from examples.demo import quality

    return quality.main(argv)


def _faults(argv: list[str], out: Path, quick: bool) -> Any:
    # Writes docs/reliability.md (figures in out/faults.json).
    from benchmarks import faults

    return faults.main(argv, out, quick)


def _lora(argv: list[str], out: Path, quick: bool) -> Any:
    # LoRA on quantized bases: the backend matrix, then switching adapters between requests
    # (`--switching` alone runs only that part).
    from benchmarks import lora

    if "--switching" in argv:
        return lora.main(argv, out)
    lora.main([*argv, "--only", "none,quanto:int8"] if quick else argv, out)
    return lora.main([*argv, "--switching", "--rounds", "2" if quick else "20"], out)


def _step_cache(argv: list[str], out: Path, quick: bool) -> Any:
    from benchmarks import step_cache

    return step_cache.main(argv, out, quick)


COMMANDS: dict[str, Callable[[list[str], Path, bool], Any]] = {
    "matrix": _matrix,
    "overhead": _serving("overhead"),
    "load": _serving("load"),
    "peer": _peer,
    "batch-size": _batch_size,
    "batching": _serving("batching"),
    "compile": _compile,
    "compile-serving": _serving("compile-serving"),
    "gpu-report": _gpu_report,
    "streaming": _streaming,
    "quality": _quality,
    "lora": _lora,
    "faults": _faults,
    "step-cache": _step_cache,
}


def clean(out: Path) -> None:
    """Remove generated outputs, keeping the recorded GPU runs."""
    if not out.exists():
        return
    for child in out.iterdir():
        if child.name.startswith(KEEP_PREFIX):
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def main(argv: list[str], default_out: Path = DEFAULT_OUT) -> int:
    parser = argparse.ArgumentParser(
        prog="qdserve bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument(
        "--out", type=Path, default=default_out, help=f"output folder (default: {default_out})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests, smoke)")
    args, rest = parser.parse_known_args(argv)
    from benchmarks import report

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = list(COMMANDS) if args.command == "all" else [args.command]
    if args.command == "all":
        clean(out)
    timings: dict[str, float] = {}
    failed: list[str] = []
    for name in names:
        start = time.perf_counter()
        print(f"qdserve bench {name} ...", flush=True)
        try:
            COMMANDS[name](rest, out, args.quick)
        except Exception as exc:  # one failing part must not hide the others' results
            failed.append(name)
            print(f"qdserve bench {name} failed: {type(exc).__name__}: {exc}", flush=True)
            (out / f"{name}.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        timings[name] = time.perf_counter() - start
        print(f"qdserve bench {name}: {timings[name]:.1f}s", flush=True)
    report.write_index(out, timings if args.command == "all" else None)
    return 1 if failed else 0
