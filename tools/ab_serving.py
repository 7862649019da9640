"""A/B serving throughput of two qdserve checkouts on this machine, back to back.

    python tools/ab_serving.py --a /path/to/old/.venv/bin/qdserve --b .venv/bin/qdserve \
        --rounds 2 --seconds 15 --concurrency 1,4,16 --out docs/benchmarks/layout-ab.md

Each round starts server A, waits until it serves compiled (`/readyz` 200 and, where the
server reports a `mode`, `compiled`), drives each concurrency level for `--seconds` with
distinct prompts and seeds (no prompt cache helps either side), stops it, then does the same
for B; rounds alternate the order. Used for the layout refactor's "same throughput within
noise" check (the servers' own settings: defaults, step cache off where the server has one).
`qdserve bench peer` compares against other servers; this compares two builds of qdserve.
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
    env.update(QDS_PORT=str(port), QDS_HOST="127.0.0.1", QDS_STEP_CACHE="off", **extra)
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
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, list[dict[str, float]]]] = {"A": {}, "B": {}}
    logs = Path(tempfile.mkdtemp(prefix="qds-ab-"))
    for rnd in range(args.rounds):
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
        f"{args.rounds} rounds alternating the order, "
        f"{args.seconds:g} s per level, distinct prompts and seeds, defaults (QDS_STEP_CACHE=off), "
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
