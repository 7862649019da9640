"""Serving benchmarks through real servers on loopback: overhead, load, batching.

Servers are subprocesses: `qdserve serve` (the real uvicorn app); the side-by-side with
LitServe is `benchmarks/peer.py`. The client is a bounded, self-stopping httpx client in this
process. Comparisons are interleaved in one run (A, B, B, A, ...) so drift on the shared
CPUs hits both sides alike.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROMPT,
    TORCH_THREADS,
    LoadResult,
    Server,
    fmt,
    image_body,
    md_table,
    meta_line,
    pooled,
    qdserve_server,
    ratio,
    run_load,
    summarize,
    write_json,
)
from service.settings import AUTO_MAX_BATCH_CPU

GEN_PATH = "/v1/images/generations"


def _server_rss(server: Server) -> dict[str, int] | None:
    """RSS and USS of the server's process tree (USS: memory unique to it, no double count)."""
    import psutil

    if server.proc is None:
        return None
    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
        rss = sum(p.memory_info().rss for p in procs)
        uss = sum(p.memory_full_info().uss for p in procs)
    except psutil.Error:
        return None
    return {"rss_bytes": rss, "uss_bytes": uss, "processes": len(procs)}


def _server_info(server: Server) -> dict[str, Any]:
    return {
        "start_to_ready_seconds": server.start_seconds,
        "memory": _server_rss(server),
        "argv": " ".join(server.argv[1:]),
        "env": {k: v for k, v in server.env.items() if k.startswith("QDS_")},
    }


def _usage_summary(results: list[LoadResult]) -> dict[str, Any] | None:
    usage = [u for r in results for u in r.usage]
    if not usage:
        return None
    return {
        key: summarize([float(u[key]) for u in usage])["mean"]
        for key in ("queue_seconds", "inference_seconds", "encode_seconds", "batch_images")
        if key in usage[0]
    }


def _merge(results: list[LoadResult]) -> dict[str, Any]:
    """Aggregate interleaved rounds: total ok over summed wall time, pooled latencies."""
    out = pooled(results)
    wall = out["wall_seconds"]
    return {
        "concurrency": results[0].concurrency,
        **out,
        "throughput_rps": out["ok"] / wall if wall else None,
        "server_usage_mean": _usage_summary(results),
    }


def _interleave(
    servers: dict[str, Server], levels: list[tuple[int, int]], rounds: int
) -> dict[str, dict[str, Any]]:
    """For each (concurrency, requests) level, alternate the servers' order every round.

    Only the server being measured runs: the others are paused (SIGSTOP on their process
    groups) meanwhile, so one server's background work does not load the CPUs the other is
    measured on. Measured: idle, LitServe 0.2.19's processes poll their queues at ~10% of a
    core in all, which made qdserve's batch-of-4 pipeline call ~20% slower while it ran
    beside it (qdserve idles at ~0.1%).
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in servers}
    names = list(servers)
    try:
        _interleave_levels(servers, names, levels, rounds, out)
    finally:
        for server in servers.values():
            server.resume()
    return out


def _interleave_levels(
    servers: dict[str, Server],
    names: list[str],
    levels: list[tuple[int, int]],
    rounds: int,
    out: dict[str, dict[str, Any]],
) -> None:
    seed = 1000
    for conc, total in levels:
        per_round = max(conc, total // rounds)
        collected: dict[str, list[LoadResult]] = {n: [] for n in names}
        for rnd in range(rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                for other, server in servers.items():
                    if other != name:
                        server.pause()
                servers[name].resume()
                base = seed

                def body(i: int, base: int = base) -> dict[str, Any]:
                    return image_body(base + i)

                # Warm the connection pool and the server at this concurrency, untimed.
                run_load(servers[name].base_url + GEN_PATH, body, conc, conc)
                res = run_load(servers[name].base_url + GEN_PATH, body, conc, per_round)
                collected[name].append(res)
                seed += per_round
        for name in names:
            out[name][str(conc)] = _merge(collected[name])


@contextmanager
def _servers(
    specs: dict[str, Callable[[Path], Server]], log_dir: Path
) -> Iterator[dict[str, Server]]:
    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        for name, start in specs.items():
            server = start(log_dir)
            stack.callback(server.stop)
            servers[name] = server
        yield servers


# -- overhead ---------------------------------------------------------------------------
class ComponentTimer:
    """Wall time inside each pipeline component (text encoders, denoiser, VAE decode, ...)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.seconds: dict[str, float] = {}
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def _add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt

    def __enter__(self) -> ComponentTimer:
        for name in ("text_encoder", "text_encoder_2", "transformer", "unet"):
            module = getattr(self.pipe, name, None)
            if module is None:
                continue
            starts: list[float] = []

            def pre(_m: Any, _a: Any, starts: list[float] = starts) -> None:
                starts.append(time.perf_counter())

            def post(_m: Any, _a: Any, _o: Any, name: str = name, s: list[float] = starts) -> None:
                self._add(name, time.perf_counter() - s.pop())

            self._handles += [
                module.register_forward_pre_hook(pre),
                module.register_forward_hook(post),
            ]
        for owner, attr, label in (
            (self.pipe.vae, "decode", "vae_decode"),
            (self.pipe.image_processor, "postprocess", "postprocess_to_pil"),
            (self.pipe, "encode_prompt", "encode_prompt_total"),
        ):
            original = getattr(owner, attr)

            def wrapped(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    self._add(_l, time.perf_counter() - t0)

            setattr(owner, attr, wrapped)
            self._restore.append((owner, attr, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for owner, attr, _original in self._restore:
            delattr(owner, attr)  # back to the class attribute


def encode_costs(image: Any, quick: bool) -> list[dict[str, Any]]:
    """Encoding cost per image at output sizes up to 1024x1024 (the GPU target size).

    Two contents: the model's own (noise-like: random weights) image resized, PNG's worst
    case; and a smooth gradient, closer to a photo. `service.imaging.encode` is what the
    service runs (PNG at compress_level 1 since this benchmark showed level 6, Pillow's
    default and the service's before, to dominate at 1024x1024); both rows are measured.
    """
    import numpy as np
    from PIL import Image

    from service.imaging import encode

    reps = 2 if quick else 5
    rows = []
    for size in (32, 512, 1024):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        smooth = np.stack(
            [
                np.add.outer(ramp, ramp) / 2,
                np.add.outer(ramp, ramp[::-1]) / 2,
                np.tile(ramp, (size, 1)),
            ],
            axis=-1,
        ).astype(np.uint8)
        contents = {
            "model output (noise-like)": image.resize((size, size), Image.Resampling.BICUBIC),
            "smooth gradient": Image.fromarray(smooth),
        }
        for content, img in contents.items():
            for label, fn in (
                ("png level 6 (before)", lambda i: _png(i, 6)),
                ("png (service, level 1)", lambda i: encode(i, "png")),
                ("jpeg q90", lambda i: encode(i, "jpeg")),
                ("webp q90", lambda i: encode(i, "webp")),
            ):
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    data = fn(img)
                    times.append(time.perf_counter() - t0)
                rows.append(
                    {
                        "size": size,
                        "content": content,
                        "format": label,
                        "seconds_median": summarize(times)["median"],
                        "bytes": len(data),
                    }
                )
    return rows


def _png(image: Any, level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def overhead(out: Path, quick: bool, log_dir: Path) -> dict[str, Any]:
    import httpx
    import torch

    torch.set_num_threads(TORCH_THREADS)
    from pipelines.generate import GenerationRequest, generate
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings
    from service.imaging import encode

    pairs = 6 if quick else 30
    loaded = load_pipeline(QuantSettings(device="cpu"))
    with _servers({"qdserve": lambda d: qdserve_server("qdserve-overhead", d)}, log_dir) as srv:
        server = srv["qdserve"]
        url = server.base_url + GEN_PATH
        client = httpx.Client(timeout=120.0)
        for i in range(3):
            generate(loaded, GenerationRequest(PROMPT, seed=i))
            client.post(url, json=image_body(i)).raise_for_status()
        direct: list[float] = []
        direct_png: list[float] = []
        http: list[float] = []
        usage: list[dict[str, float]] = []
        for i in range(pairs):
            seed = 100 + i
            order = ("direct", "http") if i % 2 == 0 else ("http", "direct")
            for side in order:
                if side == "direct":
                    t0 = time.perf_counter()
                    result = generate(loaded, GenerationRequest(PROMPT, seed=seed))
                    direct.append(time.perf_counter() - t0)
                    encode(result.images[0], "png")
                    direct_png.append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    r = client.post(url, json=image_body(seed))
                    r.raise_for_status()
                    data = r.json()
                    base64.b64decode(data["data"][0]["b64_json"])
                    http.append(time.perf_counter() - t0)
                    usage.append(data["timings"])
        client.close()
        info = _server_info(server)
    # Where the time of one direct call goes (hooks on the components; separate pass).
    timer = ComponentTimer(loaded.pipeline)
    n_break = 3 if quick else 10
    t_total = 0.0
    with timer:
        for i in range(n_break):
            t0 = time.perf_counter()
            generate(loaded, GenerationRequest(PROMPT, seed=200 + i))
            t_total += time.perf_counter() - t0
    per_call = {k: v / n_break for k, v in timer.seconds.items()}
    per_call["total"] = t_total / n_break
    per_call["other"] = per_call["total"] - sum(
        v
        for k, v in per_call.items()
        if k in ("encode_prompt_total", "transformer", "unet", "vae_decode", "postprocess_to_pil")
    )
    u = {k: summarize([float(x[k]) for x in usage])["median"] for k in usage[0]}
    sample = generate(loaded, GenerationRequest(PROMPT, seed=0)).images[0]
    d_med = summarize(direct)["median"]
    h_med = summarize(http)["median"]
    return {
        "pairs": pairs,
        "direct_seconds": summarize(direct),
        "direct_plus_png_seconds": summarize(direct_png),
        "http_seconds": summarize(http),
        "ratio_http_to_direct_median": h_med / d_med,
        "ratio_http_to_direct_plus_png_median": h_med / summarize(direct_png)["median"],
        "http_minus_direct_median_seconds": h_med - d_med,
        "server_usage_median_seconds": u,
        "direct_breakdown_seconds": per_call,
        "encode_costs": encode_costs(sample, quick),
        "server": info,
        "method": (
            "direct = pipelines.generate.generate() on a pipeline loaded in the benchmark "
            "process; http = POST /v1/images/generations (b64 PNG) to `qdserve serve` on "
            "loopback, client time including JSON and base64 decode. Interleaved pairs, order "
            "alternating. Breakdown: forward hooks / wrappers on the components of the direct "
            "pipeline (a separate pass)."
        ),
    }


def render_overhead(data: dict[str, Any]) -> str:
    d, h, dp = data["direct_seconds"], data["http_seconds"], data["direct_plus_png_seconds"]
    rows = [
        [
            "direct generate()",
            fmt(d["median"] * 1e3, 1),
            fmt(d["p25"] * 1e3, 1),
            fmt(d["p75"] * 1e3, 1),
        ],
        [
            "direct + PNG encode",
            fmt(dp["median"] * 1e3, 1),
            fmt(dp["p25"] * 1e3, 1),
            fmt(dp["p75"] * 1e3, 1),
        ],
        [
            "HTTP (qdserve serve)",
            fmt(h["median"] * 1e3, 1),
            fmt(h["p25"] * 1e3, 1),
            fmt(h["p75"] * 1e3, 1),
        ],
    ]
    u = data["server_usage_median_seconds"]
    urows = [[k, fmt(v * 1e3, 2) if k.endswith("seconds") else fmt(v, 0)] for k, v in u.items()]
    b = data["direct_breakdown_seconds"]
    brows = [[k, fmt(v * 1e3, 2), fmt(100 * v / b["total"], 1)] for k, v in b.items()]
    return (
        "\n\n".join(
            [
                "# Service overhead: direct call vs HTTP",
                meta_line(data["meta"]),
                f"{data['pairs']} interleaved pairs, embedded model at its defaults. "
                + data["method"],
                md_table(["path", "median ms", "p25 ms", "p75 ms"], rows),
                f"**HTTP / direct (medians): {data['ratio_http_to_direct_median']:.3f}** "
                f"(+{data['http_minus_direct_median_seconds'] * 1e3:.1f} ms); "
                "HTTP / (direct + PNG): "
                f"{data['ratio_http_to_direct_plus_png_median']:.3f}.",
                "Server-reported timings (medians, `timings` of the response):",
                md_table(["field", "value (ms / images)"], urows),
                "Where a direct call's time goes (mean per call; encode_prompt_total contains "
                "both text encoders):",
                md_table(["part", "ms", "% of call"], brows),
                "Image encoding per image (the service runs it in a thread, off the inference "
                "worker; median of repeats):",
                md_table(["size", "content", "format", "ms", "KiB"], _encode_rows(data)),
            ]
        )
        + "\n"
    )


def _encode_rows(data: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{e['size']}x{e['size']}",
            e["content"],
            e["format"],
            fmt(e["seconds_median"] * 1e3, 2),
            fmt(e["bytes"] / 1024, 1),
        ]
        for e in data.get("encode_costs", [])
    ]


# -- load ------------------------------------------------------------------------------
def load(out: Path, quick: bool, log_dir: Path) -> dict[str, Any]:
    levels = [(1, 4), (4, 8)] if quick else [(1, 16), (4, 40), (16, 96)]
    with _servers({"qdserve": lambda d: qdserve_server("qdserve-load", d)}, log_dir) as srv:
        res = _interleave(srv, levels, rounds=1)["qdserve"]
        info = _server_info(srv["qdserve"])
    return {
        "levels": res,
        "server": info,
        "method": "closed-loop client, `concurrency` connections, stops after `requests` "
        "(or 120 s); each level preceded by an untimed warm-up of `concurrency` requests. "
        "Server defaults (micro-batching off).",
    }


def _level_rows(levels: dict[str, Any], label: str) -> list[list[str]]:
    rows = []
    for conc, r in levels.items():
        lat = r["latency_seconds"] or {}
        rows.append(
            [
                label,
                conc,
                str(r["ok"]),
                str(sum(r["errors"].values())),
                fmt(r["throughput_rps"], 2),
                fmt(lat.get("p50", 0) * 1e3, 0),
                fmt(lat.get("p95", 0) * 1e3, 0),
                fmt(lat.get("p99", 0) * 1e3, 0),
                fmt((r.get("server_usage_mean") or {}).get("batch_images"), 2),
            ]
        )
    return rows


LEVEL_HEADER = [
    "server",
    "concurrency",
    "ok",
    "errors",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "mean batch",
]


def render_load(data: dict[str, Any]) -> str:
    return (
        "\n\n".join(
            [
                "# Load test (qdserve serve, loopback)",
                meta_line(data["meta"]),
                data["method"],
                md_table(LEVEL_HEADER, _level_rows(data["levels"], "qdserve")),
                f"Start-up (process spawn to /readyz 200): "
                f"{fmt(data['server']['start_to_ready_seconds'], 1)} s; "
                "server memory after the run: "
                f"{_mem(data['server'])}.",
            ]
        )
        + "\n"
    )


def _mem(info: dict[str, Any]) -> str:
    m = info.get("memory")
    if not m:
        return "-"
    return (
        f"RSS {m['rss_bytes'] / 2**20:.0f} MiB / USS {m['uss_bytes'] / 2**20:.0f} MiB "
        f"over {m['processes']} process(es)"
    )


# -- batching --------------------------------------------------------------------------
def batching(out: Path, quick: bool, log_dir: Path) -> dict[str, Any]:
    levels = [(4, 8)] if quick else [(4, 48), (16, 96)]

    def spec(name: str, max_batch: str) -> Callable[[Path], Server]:
        # torch's default thread count, as users run it (batch-size.md measured the same).
        return lambda d: qdserve_server(name, d, QDS_MAX_BATCH=max_batch, QDS_TORCH_THREADS="0")

    specs: dict[str, Callable[[Path], Server]] = {
        "off (QDS_MAX_BATCH=1)": spec("qdserve-batch-off", "1"),
        "QDS_MAX_BATCH=4": spec("qdserve-batch-4", "4"),
    }
    if not quick:
        name = f"default (QDS_MAX_BATCH=auto: {AUTO_MAX_BATCH_CPU} per lane on CPU)"
        specs[name] = spec("qdserve-batch-auto", "auto")
    with _servers(specs, log_dir) as srv:
        res = _interleave(srv, levels, rounds=2)
        info = {name: _server_info(s) for name, s in srv.items()}
    return {
        "levels": res,
        "throughput_gain_vs_off": _gains_vs_first(res),
        "servers": info,
        "method": "qdserve servers differing only in QDS_MAX_BATCH (step-level batching: "
        "requests join a running batch at the next step), torch at its default thread count, "
        "all up for the whole run (those not being measured paused), 2 interleaved rounds per "
        "concurrency with alternating order; identical request shapes (so every request is "
        "batchable).",
    }


# The A/B benches of one setting (batching, compile-serving): servers differing in it, the
# first config the baseline.
def _gains_vs_first(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each other config's throughput over the first config's, per concurrency."""
    base, *others = res
    return {
        name: {
            conc: ratio(r["throughput_rps"], res[base][conc]["throughput_rps"])
            for conc, r in res[name].items()
        }
        for name in others
    }


def _render_ab(data: dict[str, Any], title: str, gain_label: str, ratio_header: str) -> list[str]:
    """Title, run, method, every config's levels and the gain table of an A/B bench."""
    rows: list[list[str]] = []
    for name, levels in data["levels"].items():
        rows += _level_rows(levels, name)
    gains = [
        [name, c, fmt(g, 2)]
        for name, gs in data["throughput_gain_vs_off"].items()
        for c, g in gs.items()
    ]
    return [
        title,
        meta_line(data["meta"]),
        data["method"],
        md_table(LEVEL_HEADER, rows),
        gain_label,
        md_table(["config", "concurrency", ratio_header], gains),
    ]


def render_batching(data: dict[str, Any]) -> str:
    parts = _render_ab(
        data,
        "# Step-level batching (QDS_MAX_BATCH)",
        "Throughput gain vs batching off:",
        "throughput / off",
    )
    return "\n\n".join(parts) + "\n"


EAGER = "eager (QDS_COMPILE=false)"
BLOCKS = "compiled blocks (QDS_COMPILE_SCOPE=blocks)"
DEFAULT_COMPILED = "compiled (QDS_COMPILE=auto, the default: the whole denoiser on a CPU)"


def compile_serving(out: Path, quick: bool, log_dir: Path) -> dict[str, Any]:
    """QDS_COMPILE=false vs compiled blocks vs the default (on here: CPU with a C++ compiler,
    the whole denoiser) as servers, side by side: bench compile times the step loop alone in
    a quiet process, this times what users get."""
    levels = [(1, 8), (4, 16)] if quick else [(1, 120), (4, 300), (16, 600)]

    def spec(name: str, value: str, scope: str) -> Callable[[Path], Server]:
        return lambda d: qdserve_server(
            name, d, QDS_COMPILE=value, QDS_COMPILE_SCOPE=scope, QDS_TORCH_THREADS="0"
        )

    specs = {
        EAGER: spec("qdserve-eager", "false", "auto"),
        BLOCKS: spec("qdserve-blocks", "auto", "blocks"),
        DEFAULT_COMPILED: spec("qdserve-compiled", "auto", "auto"),
    }
    with _servers(specs, log_dir) as srv:
        res = _interleave(srv, levels, rounds=2 if quick else 3)
        info = {name: _server_info(s) for name, s in srv.items()}
    # The servers inherit the bench's QDS_* variables: QDS_QUANT_BACKEND picks the variant.
    variant = os.environ.get("QDS_QUANT_BACKEND", "none")
    if os.environ.get("QDS_QUANT_TYPE"):
        variant += f" {os.environ['QDS_QUANT_TYPE']}"
    return {
        "variant": variant,
        "levels": res,
        "throughput_gain_vs_off": _gains_vs_first(res),
        "servers": info,
        "method": f"three qdserve servers ({variant}) differing only in QDS_COMPILE and "
        "QDS_COMPILE_SCOPE, torch at its default thread count, all up for the whole run (those "
        "not measured paused), interleaved rounds per concurrency in alternating order, "
        "identical requests (the embedded model's defaults, 32x32). Start-up seconds include "
        "the compile warm-up; inductor's on-disk cache was already filled by earlier runs on "
        "this machine (an empty cache: compile.md's first-start column).",
    }


def render_compile_serving(data: dict[str, Any]) -> str:
    starts = [
        f"{name}: {fmt(info.get('start_to_ready_seconds'), 1)} s to ready"
        for name, info in data["servers"].items()
    ]
    title = (
        f"# QDS_COMPILE as served: eager vs compiled qdserve ({data.get('variant', 'none')}), "
        "side by side"
    )
    parts = _render_ab(data, title, "Throughput over eager:", "throughput / eager")
    parts.append("Start-up: " + "; ".join(starts) + ".")
    return "\n\n".join(parts) + "\n"


# -- entry -----------------------------------------------------------------------------
PARTS: dict[
    str, tuple[Callable[[Path, bool, Path], dict[str, Any]], Callable[[dict[str, Any]], str]]
] = {
    "overhead": (overhead, render_overhead),
    "load": (load, render_load),
    "batching": (batching, render_batching),
    "compile-serving": (compile_serving, render_compile_serving),
}


def headline(name: str, data: dict[str, Any]) -> str:
    if name == "overhead":
        png = {
            e["format"]: e["seconds_median"]
            for e in data.get("encode_costs", [])
            if e["size"] == 1024 and e["content"].startswith("model")
        }
        enc = (
            f"; PNG encode at 1024x1024 (noise-like): before (level 6) "
            f"{png['png level 6 (before)'] * 1e3:.0f} ms, now (level 1) "
            f"{png['png (service, level 1)'] * 1e3:.0f} ms"
            if len(png) > 1
            else ""
        )
        return (
            f"HTTP/direct median {data['ratio_http_to_direct_median']:.3f} "
            f"(+{data['http_minus_direct_median_seconds'] * 1e3:.1f} ms per image){enc}"
        )
    if name == "load":
        return "; ".join(
            f"c{c}: {r['throughput_rps']:.2f} req/s, "
            f"p50 {r['latency_seconds']['p50'] * 1e3:.0f} ms, "
            f"p99 {r['latency_seconds']['p99'] * 1e3:.0f} ms"
            for c, r in data["levels"].items()
        )
    if name in ("batching", "compile-serving"):
        return "; ".join(
            f"{n}: " + ", ".join(f"c{c} x{fmt(g, 2)}" for c, g in gs.items())
            for n, gs in data["throughput_gain_vs_off"].items()
        )
    return ""


def main(name: str, out: Path, quick: bool) -> dict[str, Any]:
    from benchmarks.common import run_meta

    measure, render = PARTS[name]
    with tempfile.TemporaryDirectory(prefix=f"qds-{name}-") as tmp:
        # The batching servers run at torch's default thread count, the others pinned.
        default_threads = name in ("batching", "compile-serving")
        threads = f"torch default ({os.cpu_count()})" if default_threads else None
        meta = run_meta(f"qdserve bench {name}" + (" --quick" if quick else ""), threads)
        data = {"meta": meta, **measure(out, quick, Path(tmp))}
    data["headline"] = headline(name, data)
    write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(render(data))
    return data
