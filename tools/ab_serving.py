"""A/B serving throughput of two qdserve checkouts on this machine, back to back.

    python tools/ab_serving.py --a /path/to/old/.venv/bin/qdserve --b .venv/bin/qdserve \
        --rounds 6 --interleave 5 --concurrency 1,4,16 \
        --out docs/benchmarks/layout-ab-interleaved.md

By default each round starts server A, waits until it serves compiled (`/readyz` 200 and, where the
server reports a `mode`, `compiled`), drives each concurrency level for `--seconds` with
distinct prompts and seeds (no prompt cache helps either side), stops it, then does the same
for B; rounds alternate the order. Used for the layout refactor's "same throughput within
noise" check (the servers' own settings: defaults, step cache off where the server has one).
`qdserve bench peer` compares against other servers; this compares two builds of qdserve.

`--interleave W` starts both servers at once instead and, per level, alternates W-second
windows A B B A ... (`--rounds` pairs): on a shared machine whose load drifts by tens of
percent over a minute, only windows this short see the same conditions on both sides (the
back-to-back mode read a 0.83x at c1 that per-request interleaving showed to be drift).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(exe: str, port: int, log: Path, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDS_")}
    # Step cache off unless a side's --env sets it (the extras win).
    env.update({"QDS_PORT": str(port), "QDS_HOST": "127.0.0.1", "QDS_STEP_CACHE": "off", **extra})
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_compiled(port: int, timeout: float) -> float:
    start = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
        while time.monotonic() - start < timeout:
            try:
                r = c.get("/readyz")
                body = r.json()
                mode = body.get("mode") or (body.get("details") or {}).get("mode")
                if r.status_code == 200 and mode in (None, "compiled"):
                    return time.monotonic() - start
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    raise TimeoutError(f"server on {port} not serving compiled after {timeout:.0f} s")


async def _level(port: int, concurrency: int, seconds: float, salt: str) -> dict[str, float]:
    latencies: list[float] = []
    images = 0
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal images
        while time.monotonic() < stop:
            i = next(counter)
            body = {"prompt": f"a red circle on the left, {salt} {i}", "seed": i}
            t0 = time.perf_counter()
            r = await client.post("/v1/images/generations", json=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                images += 1

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    return {"img_s": images / elapsed, "p50_s": statistics.median(latencies or [0.0]), "p99_s": p99}


def _interleaved(
    args: argparse.Namespace,
    levels: list[int],
    results: dict[str, dict[int, list[dict[str, float]]]],
    logs: Path,
) -> None:
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name, exe, env in (("A", args.a, args.env_a), ("B", args.b, args.env_b)):
            port = _free_port()
            extra = dict(kv.split("=", 1) for kv in env)
            procs[name] = (_start(exe, port, logs / f"{name}.log", extra), port)
        for name, (_, port) in procs.items():
            print(f"{name}: compiled after {_wait_compiled(port, 900):.1f} s", flush=True)
            asyncio.run(_level(port, 4, 3.0, "warm"))  # not measured
        for c in levels:
            for rnd in range(args.rounds):
                for name in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                    row = asyncio.run(_level(procs[name][1], c, args.interleave, f"{name}{rnd}"))
                    results[name].setdefault(c, []).append(row)
                    print(f"  c{c} {name}: {row}", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            proc.wait(120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="qdserve executable of build A (before)")
    p.add_argument("--b", required=True, help="qdserve executable of build B (after)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--env-a", action="append", default=[], help="K=V for server A's environment")
    p.add_argument("--env-b", action="append", default=[], help="K=V for server B's environment")
    p.add_argument(
        "--interleave",
        type=float,
        default=0.0,
        metavar="W",
        help="serve both at once and alternate W-second windows per level",
    )
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, list[dict[str, float]]]] = {"A": {}, "B": {}}
    logs = Path(tempfile.mkdtemp(prefix="qds-ab-"))
    if args.interleave:
        _interleaved(args, levels, results, logs)
    for rnd in range(args.rounds if not args.interleave else 0):
        order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
        for name in order:
            exe = args.a if name == "A" else args.b
            extra = dict(kv.split("=", 1) for kv in (args.env_a if name == "A" else args.env_b))
            port = _free_port()
            proc = _start(exe, port, logs / f"{name}-{rnd}.log", extra)
            try:
                ready = _wait_compiled(port, 900)
                print(f"round {rnd} {name}: compiled after {ready:.1f} s", flush=True)
                asyncio.run(_level(port, 4, 3.0, "warm"))  # not measured
                for c in levels:
                    row = asyncio.run(_level(port, c, args.seconds, f"{name}{rnd}"))
                    results[name].setdefault(c, []).append(row)
                    print(f"  c{c}: {row}", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
    lines = [
        "# Serving throughput, two builds back to back (`tools/ab_serving.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
        f"({os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f}); "
        f"A = `{args.a}` {args.env_a or ''}, B = `{args.b}` {args.env_b or ''}; "
        + (
            f"both served at once, {args.rounds} pairs of {args.interleave:g} s windows per level "
            "alternating A B B A, "
            if args.interleave
            else f"{args.rounds} rounds alternating the order, {args.seconds:g} s per level, "
        )
        + "distinct prompts and seeds, defaults (QDS_STEP_CACHE=off unless a side sets it), "
        "measured once each server served compiled.",
        "",
        "| concurrency | A img/s (median) | B img/s (median) | B / A | A p99 s | B p99 s |",
        "|---|---|---|---|---|---|",
    ]
    for c in levels:
        a = statistics.median(r["img_s"] for r in results["A"][c])
        b = statistics.median(r["img_s"] for r in results["B"][c])
        ap = statistics.median(r["p99_s"] for r in results["A"][c])
        bp = statistics.median(r["p99_s"] for r in results["B"][c])
        lines.append(f"| {c} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {ap:.3f} | {bp:.3f} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
