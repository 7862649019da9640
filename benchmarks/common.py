"""Shared pieces of the CPU benchmarks: statistics, image distance, run metadata, servers.

Every result file carries `meta` (machine, versions, date, git commit, command) so each
number in docs/benchmarks/ can be traced to the run that produced it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The benchmarks live in a qdserve checkout, not in the installed package: results go to the
# checkout's docs/benchmarks/ unless `--out` says otherwise, and subprocesses (matrix cases,
# the peer server) run from the checkout so `benchmarks` is importable there.
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks"
PROMPT = "a red circle on a blue square"
# One intra-op thread everywhere (bench process, servers, peer): the CPUs are shared, and the
# service's own QDS_TORCH_THREADS notes measured heavy OpenMP spin contention with 2 threads.
TORCH_THREADS = 1


# -- statistics ------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100]; linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, p5/p95 interquantile, IQR) in the values' own unit."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "min": min(values),
        "max": max(values),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "p95": percentile(values, 95),
        "mean": sum(values) / len(values),
    }


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
        "max": max(values),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# -- variants --------------------------------------------------------------------------
Variant = tuple[str, str | None]


def registry_variants() -> tuple[list[Variant], dict[Variant, str]]:
    """Every (backend, quant type) of the registry: those that run on this device, in registry
    order with `none` first, and those that do not, with the reason. A newly registered
    backend shows up in the benchmarks without an edit here."""
    from quantization.backends import BACKENDS
    from quantization.environment import detect_device

    device = detect_device()
    runnable: list[Variant] = []
    skipped: dict[Variant, str] = {}
    for backend in BACKENDS.values():
        for qtype in backend.quant_types or (None,):
            reason = backend.unavailable_reason(qtype, device)
            if reason is None:
                runnable.append((backend.key, qtype))
            else:
                skipped[(backend.key, qtype)] = reason
    runnable.sort(key=lambda v: v[0] != "none")  # stable: the rest keep registry order
    return runnable, skipped


def parse_variant(text: str) -> Variant:
    """ "quanto:int8" -> ("quanto", "int8"); "none" or "gguf:" -> no quant type."""
    backend, _, qtype = text.partition(":")
    return backend, (qtype if qtype not in ("", "-") else None)


def prepared_settings(variant: Variant, work_dir: Path, **values: Any) -> Any:
    """QuantSettings for a variant with the backend's offline step done (`prepare`: GGUF
    converts the denoiser into `work_dir`; others need nothing)."""
    from pipelines.loader import prepare
    from quantization.settings import QuantSettings

    backend, qtype = variant
    settings = QuantSettings.unprepared(quant_backend=backend, quant_type=qtype, **values)
    return prepare(settings, work_dir)


# -- image distance --------------------------------------------------------------------
def image_distance(a: Any, b: Any) -> dict[str, float | bool | None]:
    """PSNR (dB, 8-bit peak 255) and mean absolute difference (0..255) of two images.

    `a` and `b` are PIL images or uint8 arrays of the same shape. Identical images have an
    infinite PSNR, written as null with `identical: true` (JSON has no infinity).
    """
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    diff = x - y
    mse = float(np.mean(diff**2))
    mad = float(np.mean(np.abs(diff)))
    psnr = None if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return {"psnr_db": psnr, "mean_abs_diff": mad, "identical": mse == 0}


# -- run metadata ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def run_meta(command: str, torch_threads: int | str | None = None) -> dict[str, Any]:
    """Machine, versions, date and commit of a run; `torch_threads` defaults to the
    benchmarks' pinned TORCH_THREADS (pass what the run really used when it differs)."""
    import psutil

    from quantization.environment import library_version

    versions = {
        name: library_version(name)
        for name in (
            "torch",
            "diffusers",
            "transformers",
            "optimum-quanto",
            "torchao",
            "gguf",
            "fastapi",
            "uvicorn",
            "litserve",
            "httpx",
        )
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "torch_threads": TORCH_THREADS if torch_threads is None else torch_threads,
        # The CPUs are shared with other work: the load average says how busy they were.
        "loadavg_1_5_15_at_start": list(os.getloadavg()),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def meta_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    v = meta["versions"]
    return (
        f"Generated by `{meta['command']}` on {meta['date']} (git {meta['git_commit']}). "
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"{m['memory_bytes'] / 2**30:.1f} GiB RAM, {m['platform']}, Python {m['python']}, "
        f"load average at start {meta.get('loadavg_1_5_15_at_start', ['?'])[0]:.2f} "
        "(CPUs shared with other work); "
        f"torch {v['torch']} ({_threads(meta['torch_threads'])}), diffusers "
        f"{v['diffusers']}, transformers {v['transformers']}, optimum-quanto "
        f"{v['optimum-quanto']}, torchao {v['torchao']}, gguf {v['gguf']}, fastapi "
        f"{v['fastapi']}, uvicorn {v['uvicorn']}, litserve {v['litserve']}."
    )


def _threads(value: Any) -> str:
    if isinstance(value, dict):  # per table: {"defaults": "torch default (2)", "pinned": 1}
        return "intra-op threads: " + ", ".join(f"{k} table {v}" for k, v in value.items())
    return f"{value} intra-op thread{'' if value == 1 else 's'}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


# -- memory sampling -------------------------------------------------------------------
class PeakRSS:
    """Samples this process's RSS on a thread; `peak - base` is the peak RSS delta.

    psutil RSS (resident set) sampled every `interval` seconds; short spikes between two
    samples can be missed, so it is a lower bound on the true peak.
    """

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = False

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    @contextmanager
    def track(self) -> Iterator[PeakRSS]:
        import threading

        self.base = self.rss()
        self.peak = self.base
        self._stop = False

        def _loop() -> None:
            while not self._stop:
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        thread = threading.Thread(target=_loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop = True
            thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


# -- servers ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server subprocess on loopback (qdserve's real uvicorn, or the peer)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    start_seconds: float | None = None
    # False: the bench's own QDS_* variables are not passed on (a server "at its defaults").
    inherit_qds: bool = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout: float = 600.0) -> Server:
        import httpx

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        inherited = {
            k: v for k, v in os.environ.items() if self.inherit_qds or not k.startswith("QDS_")
        }
        env = {**inherited, **self.env}
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                r = httpx.get(self.base_url + self.ready_path, timeout=2.0)
                if r.status_code == 200 and self.start_seconds is None:
                    self.start_seconds = time.perf_counter() - started
                # qdserve is ready while it compiles in the background (QDS_COMPILE_BACKGROUND,
                # `mode` on /readyz): a bench measures it once it serves what it compiled.
                if r.status_code == 200 and _mode(r) != "compiling":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _signal(self, sig: int) -> None:
        # The server runs in its own session (started above): signal its whole group, so
        # the peer's worker processes get it too.
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """Freeze the server's processes (SIGSTOP), so its idle work costs the others nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)  # a paused server would not act on SIGTERM
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mode(response: Any) -> str | None:
    """The serving mode a /readyz body names (qdserve), None for other servers' bodies."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("mode") if isinstance(body, dict) else None


def qdserve_server(name: str, log_dir: Path, **env: str) -> Server:
    """`qdserve serve` (the real uvicorn server) on a free loopback port."""
    base = {
        "QDS_LOG_LEVEL": "WARNING",
        "QDS_TORCH_THREADS": str(TORCH_THREADS),
        "QDS_MAX_QUEUE": "256",
        "QDS_REQUEST_TIMEOUT": "300",
        # These benches compare serving with direct uncached calls and with each other; the
        # step cache (on by default) is measured by `bench step-cache`, which asks for it.
        "QDS_STEP_CACHE": "off",
        "HF_HUB_OFFLINE": "1",
    }
    server = Server(
        name,
        [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"],
        {**base, **env},
        "/readyz",
    )
    return server.start(log_dir)


# -- load generation -------------------------------------------------------------------
def image_body(seed: int, size: int = 32, steps: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "size": f"{size}x{size}",
        "seed": seed,
        "response_format": "b64_json",
        "output_format": "png",
    }
    if steps is not None:
        body["num_inference_steps"] = steps
    return body


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_seconds: float
    latencies: list[float]
    usage: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        lat = latency_summary(self.latencies) if self.latencies else None
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "wall_seconds": self.wall_seconds,
            "throughput_rps": self.ok / self.wall_seconds if self.wall_seconds else None,
            "latency_seconds": lat,
        }


@dataclass
class _Tally:
    """What a load client records: latencies and server timings of the answered requests,
    errors by kind (the closed- and open-loop clients share it)."""

    latencies: list[float] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    async def post(self, client: Any, url: str, body: dict[str, Any]) -> None:
        import httpx

        t0 = time.perf_counter()
        try:
            r = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return
        dt = time.perf_counter() - t0
        if r.status_code == 200:
            self.latencies.append(dt)
            data = r.json()
            if isinstance(data.get("timings"), dict):
                self.usage.append(data["timings"])
        else:
            key = f"http_{r.status_code}"
            self.errors[key] = self.errors.get(key, 0) + 1

    def result(self, concurrency: int, requests: int, wall: float) -> LoadResult:
        ok = len(self.latencies)
        return LoadResult(concurrency, requests, ok, self.errors, wall, self.latencies, self.usage)


async def _load(
    url: str,
    body_for: Callable[[int], dict[str, Any]],
    concurrency: int,
    total: int,
    max_seconds: float,
) -> LoadResult:
    """Closed-loop client: `concurrency` workers send `total` requests, then stop.

    Bounded twice: by the request count, and by `max_seconds` (workers stop taking new
    requests after it), so a slow server cannot keep the benchmark running.
    """
    import httpx

    issued = 0
    tally = _Tally()
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300.0, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < total and time.perf_counter() - start < max_seconds:
                i = issued
                issued += 1
                await tally.post(client, url, body_for(i))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally.result(concurrency, issued, time.perf_counter() - start)


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at `rate` per second."""
    import random

    rng = random.Random(seed)
    arrivals: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


async def _open_load(
    url: str,
    body_for: Callable[[int], dict[str, Any]],
    rate: float,
    seconds: float,
    seed: int,
) -> LoadResult:
    """Open-loop client: requests arrive as a Poisson process of `rate` per second for
    `seconds` (the arrival times drawn from `seed`, so every server gets the same schedule),
    each sent at its time whether or not earlier ones have been answered; then the answers
    still out are awaited. Wall time runs to the last answer."""
    import httpx

    arrivals = poisson_arrivals(rate, seconds, seed)
    tally = _Tally()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300.0, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            await tally.post(client, url, body_for(i))

        await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))
        return tally.result(0, len(arrivals), time.perf_counter() - start)


def run_open_load(
    url: str, body_for: Callable[[int], dict[str, Any]], rate: float, seconds: float, seed: int
) -> LoadResult:
    return asyncio.run(_open_load(url, body_for, rate, seconds, seed))


def pooled(results: Sequence[LoadResult]) -> dict[str, Any]:
    """Interleaved rounds pooled: requests, ok and errors summed, wall times summed, latency
    percentiles over every request (the fields `bench peer` and `bench load` share)."""
    lat = [x for r in results for x in r.latencies]
    wall = sum(r.wall_seconds for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "requests": sum(r.requests for r in results),
        "ok": sum(r.ok for r in results),
        "errors": errors,
        "wall_seconds": wall,
        "latency_seconds": latency_summary(lat) if lat else None,
    }


def run_load(
    url: str,
    body_for: Callable[[int], dict[str, Any]],
    concurrency: int,
    total: int,
    max_seconds: float = 120.0,
) -> LoadResult:
    return asyncio.run(_load(url, body_for, concurrency, total, max_seconds))


def replace_section(md_path: Path, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) into `md_path`, in place
    of an earlier one between the same markers, else at the end of the file."""
    text = md_path.read_text() if md_path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if 0 <= start < stop:
        text = text[:start] + section + text[stop + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md_path.write_text(text)


def png_roundtrip(b64: str) -> Any:
    """Decode a b64 PNG from a response into a PIL image (quality checks)."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def fetch_images(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[Any]:
    """POST every body to `url` (an images endpoint), `concurrency` at a time, and return the
    first answer image of each as a PIL image, in the bodies' order."""
    import httpx

    async def run() -> list[Any]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

            async def one(body: dict[str, Any]) -> Any:
                async with sem:
                    r = await client.post(url, json=body)
                    r.raise_for_status()
                    return png_roundtrip(r.json()["data"][0]["b64_json"])

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    return asyncio.run(run())


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB (8-bit peak) of two RGB images; inf when identical."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
