"""`qdserve bench peer`: qdserve and a plain LitServe server side by side, as users run them.

The peer is `benchmarks/peer_server.py`: a LitServe `LitAPI` around the same
`pipelines.loader.load_pipeline` / `generate_batch`, with LitServe's batching as its docs'
typical example sets it (max batch 4, 25 ms). Both servers load the same pipeline folder with
the same quantization settings (`--variant`, default unquantized) and get the same requests:
OpenAI images JSON (b64 PNG) at the same seeds, at concurrency 1, 4 and 16.

Two tables:

- defaults (the headline): every server as a user starts it, torch at its default thread
  count, qdserve with no QDS_* tuning (so its step cache on: `QDS_STEP_CACHE`'s default),
  LitServe with only its batching example set, and beside them (`--qdserve`, `--peers`):
  qdserve with `QDS_STEP_CACHE=off` (the same work as a peer without a step cache), LitServe
  + compile (the one line a user would add, `pipe.transformer.compile()` in `setup`, warmed up
  at batch sizes 1..4 before it reports ready), and LitServe + TaylorSeer (the one line a user
  would add to cache steps, diffusers' `enable_cache` with qdserve's default parameters). The
  answers' quality is measured in the same run: the demo prompt set through every server,
  adherence and PSNR against plain LitServe's (uncached) image of the same request;
- pinned: qdserve uncached and plain LitServe pinned to `--pinned-threads` torch threads.
  Pinning hides how a server shares the cores with its own HTTP work, which is why it is the
  second table, not the first.

Each table also has a ceiling row: a direct in-process pipeline call (no HTTP) at batch 1 and
batch 4 with the table's thread count. Rounds are interleaved (A, B, B, A, ...) with the
server not being measured paused (SIGSTOP), so drift on shared CPUs hits both alike. Every
request carries its own prompt (`request_prompt`: the same for every server), so no server's
prompt-embedding cache helps it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROMPT,
    LoadResult,
    Server,
    Variant,
    fetch_images,
    fmt,
    image_body,
    latency_summary,
    md_table,
    meta_line,
    parse_variant,
    pooled,
    prepared_settings,
    psnr,
    ratio,
    run_load,
    run_meta,
    run_open_load,
    summarize,
    write_json,
)
from pipelines.step_cache import TAYLOR_ORDER, TAYLOR_WARMUP_STEPS, TAYLORSEER, parse
from service.settings import AUTO_MAX_BATCH_CPU, DEFAULT_STEP_CACHE, batch_limit, lane_count

GEN_PATH = "/v1/images/generations"
TABLES = ("defaults", "pinned", "equal-batch")
# LitServe's batching as its documentation's typical example sets it.
LITSERVE_MAX_BATCH = 4
LITSERVE_BATCH_TIMEOUT_S = 0.025
# The peers a table may serve beside qdserve: plain LitServe, and LitServe with its denoiser
# compiled (the defaults table only; `--peers` picks).
LITSERVE = "litserve"
LITSERVE_COMPILED = "litserve-compiled"
LITSERVE_TAYLORSEER = "litserve-taylorseer"
PEERS = (LITSERVE, LITSERVE_COMPILED, LITSERVE_TAYLORSEER)
# qdserve as users start it (its step cache on by default), and with the step cache off: the
# same work as the peers that cache nothing.
QDSERVE = "qdserve"
QDSERVE_UNCACHED = "qdserve-uncached"
OURS = (QDSERVE, QDSERVE_UNCACHED)
SERVERS = (*OURS, *PEERS)
# The uncached answer every other is compared with in the quality rows (the first present).
QUALITY_REFERENCE = (LITSERVE, QDSERVE_UNCACHED)
# Start-up limit of the compiled peer: compiling and warming 4 batch sizes on a shared CPU.
COMPILED_START_TIMEOUT_S = 1800.0
# The third contender at concurrency 1: a direct batch-1 call in the bench process.
DIRECT = "direct"
# The seed of every quality request (the demo prompt set; step-cache.md uses the same).
QUALITY_SEED = 0
# Enough requests that a level always ends by time (`--seconds`), never by count.
UNBOUNDED = 10**9


@dataclass(frozen=True)
class PeerOptions:
    variant: str = "none"
    rounds: int = 3
    seconds: float = 20.0
    concurrency: tuple[int, ...] = (1, 4, 16)
    pinned_threads: int = 1
    tables: tuple[str, ...] = TABLES
    peers: tuple[str, ...] = PEERS
    ours: tuple[str, ...] = OURS
    direct_calls: int = 10
    pairs: int = 30
    rates: tuple[float, ...] = (8.0,)
    quality: bool = True
    model: str | None = None
    size: int | None = None
    steps: int | None = None
    name: str | None = None

    @property
    def parsed_variant(self) -> Variant:
        return parse_variant(self.variant)

    @property
    def side(self) -> int:
        """Width and height of every request (`--size`; the embedded model's 32 by default)."""
        return self.size or 32

    @property
    def slug(self) -> str:
        """File stem: `--name`, else peer (unquantized) or peer-quanto-int8."""
        if self.name:
            return self.name
        backend, qtype = self.parsed_variant
        if backend == "none":
            return "peer"
        return "peer-" + "-".join(p for p in (backend, qtype) if p).replace("_", "-")


def parse_options(argv: Sequence[str], quick: bool = False) -> PeerOptions:
    p = argparse.ArgumentParser(prog="qdserve bench peer", description=__doc__)
    p.add_argument(
        "--variant",
        default="none",
        help="backend:quant_type both servers load, e.g. quanto:int8 or torchao:int8wo",
    )
    p.add_argument("--rounds", type=int, default=1 if quick else 3, help="interleaved rounds")
    p.add_argument(
        "--seconds",
        type=float,
        default=2.0 if quick else 20.0,
        help="measured seconds per server, level and round",
    )
    p.add_argument(
        "--concurrency", default="1,4" if quick else "1,4,16", help="comma list of levels"
    )
    p.add_argument("--pinned-threads", type=int, default=1, help="threads in the pinned table")
    p.add_argument(
        "--tables",
        default=",".join(TABLES),
        help="comma list of defaults (headline), pinned (equal pinned torch threads), "
        "equal-batch (LitServe's max_batch_size set to qdserve's batch limit on the device)",
    )
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma list of the defaults table's peers: litserve (plain), litserve-compiled "
        "(pipe.transformer.compile() in setup, warmed up), litserve-taylorseer (diffusers' "
        "TaylorSeer hook, qdserve's default parameters); the other tables serve plain litserve",
    )
    p.add_argument(
        "--qdserve",
        default=",".join(OURS),
        help="comma list of the defaults table's qdserve servers: qdserve (its defaults, step "
        "cache on), qdserve-uncached (QDS_STEP_CACHE=off); the other tables serve "
        "qdserve-uncached",
    )
    p.add_argument("--direct-calls", type=int, default=3 if quick else 10)
    p.add_argument(
        "--rates",
        default="" if quick else "8",
        help="comma list of open-loop levels in the defaults table: Poisson arrivals at that "
        "many requests per second (empty: none)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=5 if quick else 30,
        help="direct call + qdserve request pairs at concurrency 1 (CPU; 0: none)",
    )
    p.add_argument(
        "--no-quality",
        action="store_true",
        help="skip the quality rows (the demo prompt set through every server)",
    )
    p.add_argument(
        "--model",
        help="pipeline folder both servers load (default: the embedded model); on a GPU, "
        "`python -m benchmarks.gpu_pipeline` builds a Flux-dev-size one",
    )
    p.add_argument("--size", type=int, help="image side in pixels (default: 32)")
    p.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    p.add_argument("--name", help="file stem of the report (default: peer[-variant])")
    args = p.parse_args(list(argv))
    tables = tuple(t for t in args.tables.split(",") if t)
    if unknown := set(tables) - set(TABLES):
        p.error(f"unknown table(s) {sorted(unknown)}; choose from {', '.join(TABLES)}")
    peers = tuple(x for x in args.peers.split(",") if x)
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if not peers:
        p.error("--peers needs at least one peer")
    ours = tuple(x for x in args.qdserve.split(",") if x)
    if unknown := set(ours) - set(OURS):
        p.error(f"unknown qdserve server(s) {sorted(unknown)}; choose from {', '.join(OURS)}")
    if not ours:
        p.error("--qdserve needs at least one qdserve server")
    return PeerOptions(
        variant=args.variant,
        rounds=args.rounds,
        seconds=args.seconds,
        concurrency=tuple(int(c) for c in args.concurrency.split(",") if c),
        pinned_threads=args.pinned_threads,
        tables=tables,
        peers=peers,
        ours=ours,
        direct_calls=args.direct_calls,
        pairs=args.pairs,
        rates=tuple(float(r) for r in args.rates.split(",") if r),
        quality=not args.no_quality,
        model=args.model,
        size=args.size,
        steps=args.steps,
        name=args.name,
    )


# -- the two servers ---------------------------------------------------------------------
def qdserve_env(settings: Any, threads: int | None, uncached: bool = False) -> dict[str, str]:
    """qdserve's environment: the pipeline and quantization settings, nothing else unless
    pinned, or `uncached` (QDS_STEP_CACHE=off: the work of a peer that caches no step). (The
    bench's own QDS_* variables are not passed on: defaults mean defaults.)"""
    env = {"QDS_MODEL": str(settings.model), "QDS_QUANT_BACKEND": settings.quant_backend}
    if uncached:
        env["QDS_STEP_CACHE"] = "off"
    if settings.quant_type:
        env["QDS_QUANT_TYPE"] = settings.quant_type
    if settings.gguf_file:
        env["QDS_GGUF_FILE"] = str(settings.gguf_file)
    if threads:
        env["QDS_TORCH_THREADS"] = str(threads)
    return env


def auto_batch(device: str, threads: int) -> int:
    """qdserve's QDS_MAX_BATCH=auto on this device with this many torch threads (its lanes)."""
    return batch_limit("auto", device, lane_count("auto", device, threads))


def table_threads(table: str, pinned: int) -> int | None:
    """Torch threads both servers get: None (torch's default) except in the pinned table."""
    return pinned if table == "pinned" else None


def litserve_batch(table: str, qdserve_batch: int) -> int:
    """LitServe's max_batch_size: its docs' example (4), or qdserve's own batch limit on this
    device in the equal-batch table (a tuned peer: what LitServe does at the batch qdserve
    runs)."""
    return qdserve_batch if table == "equal-batch" else LITSERVE_MAX_BATCH


def table_peers(table: str, peers: Sequence[str]) -> tuple[str, ...]:
    """The peers of a table: `--peers` in the defaults (headline) table, plain LitServe in
    the others (their question is threads or batch size, not compile)."""
    return tuple(peers) if table == "defaults" else (LITSERVE,)


def table_ours(table: str, ours: Sequence[str]) -> tuple[str, ...]:
    """qdserve's servers in a table: `--qdserve` in the defaults table, uncached in the others
    (the same work as plain LitServe: their question is threads or batch size)."""
    return tuple(ours) if table == "defaults" else (QDSERVE_UNCACHED,)


def taylorseer_interval() -> int:
    """The interval of qdserve's default step cache, which LitServe + TaylorSeer is given."""
    spec = parse(DEFAULT_STEP_CACHE)
    if spec is None or spec.method != TAYLORSEER:
        raise ValueError(f"qdserve's default step cache {DEFAULT_STEP_CACHE!r} is not TaylorSeer")
    return spec.interval


def request_prompt(seed: int) -> str:
    """The prompt of the request with `seed`: distinct per request, so a prompt-embedding
    cache never helps, the same for every server and the direct call."""
    return f"{PROMPT}, variation {seed}"


def litserve_argv(
    settings_path: Path,
    threads: int | None,
    max_batch: int,
    compiled: bool = False,
    size: int = 32,
    steps: int | None = None,
    taylorseer: int | None = None,
) -> list[str]:
    # The compiled peer warms up at the bench's size and steps, batch 1..max_batch.
    warm = ["--compile", "--warmup-size", str(size)] if compiled else []
    if compiled and steps is not None:
        warm += ["--warmup-steps", str(steps)]
    if taylorseer:
        warm += ["--taylorseer", str(taylorseer)]
    return [
        sys.executable,
        "-m",
        "benchmarks.peer_server",
        "--port",
        "{port}",
        "--settings",
        str(settings_path),
        "--max-batch-size",
        str(max_batch),
        "--batch-timeout",
        str(LITSERVE_BATCH_TIMEOUT_S),
        "--torch-threads",
        str(threads or 0),
        *warm,
    ]


def start_servers(
    settings: Any,
    settings_path: Path,
    threads: int | None,
    log_dir: Path,
    table: str,
    litserve_max: int,
    opts: PeerOptions | None = None,
) -> dict[str, Server]:
    opts = opts or PeerOptions()
    ours = {
        name: Server(
            f"{name}-{table}",
            [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"],
            {
                "HF_HUB_OFFLINE": "1",
                **qdserve_env(settings, threads, uncached=name == QDSERVE_UNCACHED),
            },
            "/readyz",
            inherit_qds=False,
        )
        for name in table_ours(table, opts.ours)
    }
    peers = {
        name: Server(
            f"{name}-{table}",
            litserve_argv(
                settings_path,
                threads,
                litserve_max,
                compiled=name == LITSERVE_COMPILED,
                size=opts.side,
                steps=opts.steps,
                taylorseer=taylorseer_interval() if name == LITSERVE_TAYLORSEER else None,
            ),
            {"HF_HUB_OFFLINE": "1"},
            "/health",
            inherit_qds=False,
        )
        for name in table_peers(table, opts.peers)
    }
    servers: dict[str, Server] = {}
    try:
        for name, server in (*ours.items(), *peers.items()):
            timeout = COMPILED_START_TIMEOUT_S if name == LITSERVE_COMPILED else 600.0
            servers[name] = server.start(log_dir, timeout=timeout)
            server.pause()  # idle until measured: its start-up work must not slow the other
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def same_requests(
    opts: PeerOptions, round_index: int, level: int
) -> Callable[[int], dict[str, Any]]:
    """The i-th request of a round and level: identical for every server, its own prompt."""
    base = 100_000 * (round_index + 1) + 1_000 * level

    def body(i: int) -> dict[str, Any]:
        return {**image_body(base + i, opts.side, opts.steps), "prompt": request_prompt(base + i)}

    return body


def open_level(rate: float) -> str:
    """The level key of Poisson arrivals at `rate` requests per second."""
    return f"poisson {rate:g}/s"


def interleave(
    servers: dict[str, Server],
    opts: PeerOptions,
    lone: Callable[[int], Any] | None = None,
    rates: Sequence[float] = (),
) -> dict[str, dict[str, list[LoadResult]]]:
    """For each level and round, each contender in turn (the order rotating), the others
    paused. `lone` (one direct batch-1 pipeline call for a seed) is a third contender at
    concurrency 1, timed in the same rounds: a lone request's latency against a direct call
    taken at the same moment, not minutes later on a machine that drifts. `rates` add
    open-loop levels: Poisson arrivals at that many requests per second, the same arrival
    times for both servers in a round."""
    results: dict[str, dict[str, list[LoadResult]]] = {n: {} for n in servers}
    if lone is not None:
        results[DIRECT] = {}
    levels: list[tuple[str, int, float | None]] = [(str(c), c, None) for c in opts.concurrency]
    levels += [(open_level(r), 1000 + i, r) for i, r in enumerate(rates)]
    try:
        for key, conc, rate in levels:
            names = list(servers) + ([DIRECT] if lone is not None and conc == 1 else [])
            for rnd in range(opts.rounds if names else 0):
                shift = rnd % len(names)
                for name in names[shift:] + names[:shift]:
                    for server in servers.values():
                        server.pause()
                    body = same_requests(opts, rnd, conc)
                    if name == DIRECT:
                        assert lone is not None
                        res = timed_calls(lone, body, opts.seconds)
                    else:
                        servers[name].resume()
                        url = servers[name].base_url + GEN_PATH
                        warm = conc if rate is None else 4
                        run_load(url, body, warm, warm)  # untimed warm-up
                        if rate is None:
                            res = run_load(url, body, conc, UNBOUNDED, max_seconds=opts.seconds)
                        else:
                            res = run_open_load(url, body, rate, opts.seconds, seed=rnd)
                        servers[name].pause()
                    results[name].setdefault(key, []).append(res)
    finally:
        for server in servers.values():
            server.resume()
    return results


def paired(
    server: Server, lone: Callable[[int], Any], opts: PeerOptions, pairs: int
) -> dict[str, Any]:
    """A lone request against a direct call taken right beside it: `pairs` times, one direct
    batch-1 call and the same request (same seed) to `server` over HTTP, in alternating order,
    the other server paused. Pairing cancels the drift that whole rounds on a shared machine
    still see; the ratio of the medians is the overhead a user sees over calling the
    pipeline."""
    import httpx

    body = same_requests(opts, 0, 1)
    direct: list[float] = []
    http: list[float] = []
    server.resume()
    try:
        with httpx.Client(timeout=300.0) as client:
            url = server.base_url + GEN_PATH
            for i in range(-1, pairs):  # the first pair warms both paths, untimed
                # Which goes first alternates, so neither always follows the other.
                for which in ("direct", "http")[:: 1 if i % 2 else -1]:
                    t0 = time.perf_counter()
                    if which == "direct":
                        lone(int(body(i)["seed"]))
                    else:
                        client.post(url, json=body(i)).raise_for_status()
                    if i >= 0:
                        (direct if which == "direct" else http).append(time.perf_counter() - t0)
    finally:
        server.pause()
    d, h = summarize(direct)["median"], summarize(http)["median"]
    return {
        "pairs": pairs,
        "direct_seconds": latency_summary(direct),
        "qdserve_seconds": latency_summary(http),
        "p50_qdserve_over_direct": h / d,
    }


def answer_quality(
    servers: dict[str, Server], opts: PeerOptions, concurrency: int = 4
) -> dict[str, Any]:
    """The demo prompt set at one seed through every server, `concurrency` requests at a time,
    the others paused: adherence (the demo checker; the embedded model only) and PSNR against
    the uncached answer to the same request (`QUALITY_REFERENCE`: plain LitServe's, else
    qdserve's with the step cache off). What a step cache costs, measured in the same run as
    what it gains."""
    from examples.demo.quality import PROMPTS
    from pipelines.demo_checker import adheres

    bodies = [{**image_body(QUALITY_SEED, opts.side, opts.steps), "prompt": p} for p in PROMPTS]
    images: dict[str, list[Any]] = {}
    for name, server in servers.items():
        server.resume()
        try:
            images[name] = fetch_images(server.base_url + GEN_PATH, bodies, concurrency)
        finally:
            server.pause()
    ref = next((n for n in QUALITY_REFERENCE if n in images), None)
    out: dict[str, Any] = {}
    for name, answers in images.items():
        row: dict[str, Any] = {"images": len(answers), "reference": ref}
        if opts.model is None:
            passed = sum(adheres(im, pr) for im, pr in zip(answers, PROMPTS, strict=True))
            row["adherence"] = passed / len(answers)
        if ref is not None:
            dbs = [psnr(a, b) for a, b in zip(answers, images[ref], strict=True)]
            finite = [d for d in dbs if math.isfinite(d)]
            row |= {
                # Identical images (inf dB) count as 100 dB in the mean, counted apart.
                "psnr_mean_db": sum(min(d, 100.0) for d in dbs) / len(dbs),
                "psnr_min_db": min(finite) if finite else None,
                "identical": len(dbs) - len(finite),
            }
        out[name] = row
    return out


def timed_calls(
    call: Callable[[int], Any], body: Callable[[int], dict[str, Any]], seconds: float
) -> LoadResult:
    """`call(seed)` back to back for `seconds` with the seeds of the servers' requests
    (`body`), after one untimed call: a concurrency-1 load without HTTP."""
    call(int(body(0)["seed"]))
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call(int(body(len(latencies))["seed"]))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    n = len(latencies)
    return LoadResult(1, n, n, {}, wall, latencies, [])


def merge(results: list[LoadResult]) -> dict[str, Any]:
    """Rounds pooled: images over summed wall time, latency percentiles over all requests."""
    out = pooled(results)
    wall = out["wall_seconds"]
    usage = [u for r in results for u in r.usage]
    batches = [float(u["batch_images"]) for u in usage if "batch_images" in u]
    # qdserve's own account of where a request's time went (LitServe's answer has none).
    timings = {
        k: sum(float(u[k]) for u in usage) / len(usage)
        for k in ("queue_seconds", "inference_seconds", "encode_seconds")
        if usage and all(k in u for u in usage)
    }
    return {
        **out,
        "mean_timings_seconds": timings or None,
        "images_per_second": out["ok"] / wall if wall else None,
        "per_round_images_per_second": [r.ok / r.wall_seconds for r in results if r.wall_seconds],
        "mean_batch_images": sum(batches) / len(batches) if batches else None,
    }


def server_info(server: Server) -> dict[str, Any]:
    import psutil

    memory = None
    if server.proc is not None:
        try:
            root = psutil.Process(server.proc.pid)
            procs = [root, *root.children(recursive=True)]
            memory = {
                "rss_bytes": sum(p.memory_info().rss for p in procs),
                "processes": len(procs),
            }
        except psutil.Error:
            pass
    return {
        "start_to_ready_seconds": server.start_seconds,
        "memory_after_run": memory,
        "argv": " ".join(server.argv[1:]),
        "env": dict(server.env),
    }


# -- the ceiling ---------------------------------------------------------------------------
def direct_request(opts: PeerOptions, seed: int, defaults: Any) -> Any:
    """The request both servers get for `seed`, as a direct call takes it (final: the
    model's `defaults` fill what the options leave open)."""
    from pipelines.generate import GenerationRequest, resolve

    return resolve(
        defaults,
        GenerationRequest(
            request_prompt(seed),
            seed=seed,
            width=opts.side,
            height=opts.side,
            num_inference_steps=opts.steps,
        ),
    )


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def direct_calls(
    loaded: Any, threads: int, opts: PeerOptions, qdserve_batch: int
) -> dict[str, Any]:
    """A direct in-process pipeline call at batch 1, 4 (LitServe's example) and qdserve's
    batch limit on this device with `threads` torch threads (servers stopped meanwhile): the
    most a server batching that far could serve on this machine."""
    from pipelines.generate import generate_batch

    out: dict[str, Any] = {}
    with torch_threads(threads):
        for batch in sorted({1, LITSERVE_MAX_BATCH, qdserve_batch}):

            def call(seed: int, batch: int = batch) -> Any:
                return generate_batch(
                    loaded, [direct_request(opts, seed + j, loaded.defaults) for j in range(batch)]
                )

            warm = call(0)[0].images[0]
            times = []
            for i in range(opts.direct_calls):
                t0 = time.perf_counter()
                call(1000 + i * batch)
                times.append(time.perf_counter() - t0)
            med = summarize(times)["median"]
            out[str(batch)] = {
                "batch": batch,
                "calls": opts.direct_calls,
                "seconds_per_call": latency_summary(times),
                "images_per_second": batch / med,
            }
            if batch == 1:
                out["1"]["png_b64_seconds"] = answer_encoding_seconds(warm)
    return out


def lone_direct_call(loaded: Any, threads: int, opts: PeerOptions) -> Callable[[int], Any]:
    """One direct batch-1 call for a seed, at `threads` torch threads: the third contender of
    the concurrency-1 rounds (`interleave`)."""
    from pipelines.generate import generate_batch

    def call(seed: int) -> Any:
        with torch_threads(threads):
            return generate_batch(loaded, [direct_request(opts, seed, loaded.defaults)])

    return call


def answer_encoding_seconds(image: Any, repeats: int = 5) -> float:
    """Median seconds to turn one image into what both servers answer (PNG, base64) with
    qdserve's encoder: part of every server's latency, not of a direct call's."""
    import base64

    from service.imaging import encode

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base64.b64encode(encode(image, "png"))
        times.append(time.perf_counter() - t0)
    return summarize(times)["median"]


# -- one run ---------------------------------------------------------------------------------
def measure(opts: PeerOptions, work: Path) -> dict[str, Any]:
    import torch

    from pipelines.loader import load_pipeline, resolve_model
    from quantization.environment import detect_device, resolve_device

    default_threads = torch.get_num_threads()  # before anything pins it: torch's default
    extra = {"model": opts.model} if opts.model else {}
    settings = prepared_settings(opts.parsed_variant, work, **extra)
    # One folder for both servers (and the direct call), named by its path.
    _, folder = resolve_model(settings)
    settings = type(settings).model_validate({**settings.model_dump(), "model": folder})
    settings_path = work / "settings.json"
    write_json(settings_path, settings.model_dump(mode="json"))
    device = resolve_device(settings.device)
    qdserve_batch = auto_batch(device, default_threads)
    # On a CPU the bench's own copy is loaded first, so a direct call runs in the same rounds
    # as the servers at concurrency 1. On a GPU it is loaded after the first table's servers
    # have stopped: a third copy of a real-size denoiser beside theirs would not fit an 80 GB
    # card, so there the direct calls come after the servers' rounds.
    loaded = load_pipeline(settings) if device == "cpu" else None
    tables: dict[str, Any] = {}
    for table in opts.tables:
        threads = table_threads(table, opts.pinned_threads)
        direct_threads = default_threads if threads is None else threads
        # The pinned table's one thread means one lane, so a smaller auto limit there.
        table_batch = auto_batch(device, direct_threads)
        litserve_max = litserve_batch(table, table_batch)
        servers = start_servers(
            settings, settings_path, threads, work / "logs", table, litserve_max, opts
        )
        lone = lone_direct_call(loaded, direct_threads, opts) if loaded is not None else None
        try:
            raw = interleave(servers, opts, lone, opts.rates if table == "defaults" else ())
            # A direct call caches no step: it is paired with the uncached qdserve where one runs.
            mine = next(n for n in (QDSERVE_UNCACHED, QDSERVE) if n in servers)
            pairs = (
                {**paired(servers[mine], lone, opts, opts.pairs), "server": mine}
                if lone is not None and opts.pairs and 1 in opts.concurrency
                else None
            )
            quality = (
                answer_quality(servers, opts) if opts.quality and table == "defaults" else None
            )
            info = {name: server_info(s) for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        lone_rounds = raw.pop(DIRECT, {}).get("1")
        levels = {
            name: {c: merge(rs) for c, rs in by_level.items()} for name, by_level in raw.items()
        }
        loaded = loaded or load_pipeline(settings)
        direct = direct_calls(loaded, direct_threads, opts, table_batch)
        if lone_rounds:
            direct["1"]["in_rounds"] = merge(lone_rounds)
        server_threads = f"torch default ({default_threads})" if threads is None else threads
        tables[table] = {
            "torch_threads": {
                **{name: server_threads for name in servers},
                "direct": direct_threads,
            },
            "levels": levels,
            "litserve_max_batch": litserve_max,
            "qdserve_auto_batch": table_batch,
            "paired_c1": pairs,
            "quality": quality,
            "direct": direct,
            "ratios": ratios(levels, direct),
            "servers": info,
        }
    return {
        "variant": opts.variant,
        "device": {"kind": device, "name": detect_device().name},
        "qdserve_auto_batch": qdserve_batch,
        "qdserve_step_cache": DEFAULT_STEP_CACHE,
        "model_folder": folder,
        "settings": settings.model_dump(mode="json"),
        "options": {**asdict(opts), "concurrency": list(opts.concurrency)},
        "peer": {
            "framework": "litserve",
            "version": importlib.metadata.version("litserve"),
            "code": "benchmarks/peer_server.py",
            "max_batch_size": LITSERVE_MAX_BATCH,
            "batch_timeout_s": LITSERVE_BATCH_TIMEOUT_S,
            "peers": list(opts.peers),
            "compiled": {
                "line": "pipe.transformer.compile()",
                "where": "DiffusersAPI.setup, then one call at each batch size 1..max_batch_size "
                "(bench size and steps) before ready",
                "tables": ["defaults"],
            },
            "taylorseer": {
                "line": "pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval="
                f"{taylorseer_interval()}, disable_cache_before_step={TAYLOR_WARMUP_STEPS}, "
                f"max_order={TAYLOR_ORDER}, taylor_factors_dtype=torch.float32, "
                "use_lite_mode=True))",
                "where": "DiffusersAPI.setup",
                "tables": ["defaults"],
            },
        },
        "tables": tables,
        "torch_threads_default": default_threads,
        "distinct_prompts": True,
    }


def peer_key(peer: str) -> str:
    """A server's part of a ratio's key: qdserve_uncached, litserve, litserve_compiled."""
    return peer.replace("-", "_")


def ratios(levels: dict[str, dict[str, Any]], direct: dict[str, Any]) -> dict[str, Any]:
    """Each qdserve server over each peer per level: `*_qdserve_over_litserve` (the keys older
    reports have), `*_qdserve_over_litserve_compiled`, `*_qdserve_uncached_over_...` where
    those ran."""
    out: dict[str, Any] = {}
    for mine in OURS:
        if mine not in levels:
            continue
        mk = peer_key(mine)
        for conc, q in levels[mine].items():
            q_lat = q["latency_seconds"] or {}
            row = out.setdefault(conc, {})
            call = lone_p50(direct["1"]) if conc == "1" else None
            if conc == "1":
                row[f"p50_{mk}_over_direct_batch1"] = ratio(q_lat.get("p50"), call)
            for peer in PEERS:
                if conc not in levels.get(peer, {}):
                    continue
                p = levels[peer][conc]
                p_lat, key = p["latency_seconds"] or {}, peer_key(peer)
                row |= {
                    f"images_per_second_{mk}_over_{key}": ratio(
                        q["images_per_second"], p["images_per_second"]
                    ),
                    f"p50_{mk}_over_{key}": ratio(q_lat.get("p50"), p_lat.get("p50")),
                    f"p99_{mk}_over_{key}": ratio(q_lat.get("p99"), p_lat.get("p99")),
                }
                if conc == "1":
                    row[f"p50_{key}_over_direct_batch1"] = ratio(p_lat.get("p50"), call)
    return out


def lone_p50(direct1: dict[str, Any]) -> float:
    """A lone request's yardstick: the direct batch-1 call timed in the concurrency-1 rounds
    where there is one (CPU), else the one timed after the servers (GPU, older reports)."""
    rounds = direct1.get("in_rounds")
    if rounds and rounds.get("latency_seconds"):
        return rounds["latency_seconds"]["p50"]
    return direct1["seconds_per_call"]["p50"]


# -- the report --------------------------------------------------------------------------------
HEADER = ["server", "concurrency", "ok", "errors", "img/s", "p50 ms", "p99 ms", "mean batch"]
TITLES = {
    "defaults": "As users run them (defaults): the headline",
    "pinned": "Both pinned to the same torch thread count",
    "equal-batch": "LitServe tuned to qdserve's batch limit (a second table, not the headline)",
}


def _ms(seconds: float | None) -> str:
    return fmt(None if seconds is None else seconds * 1e3, 0)


def level_row(name: str, level: str, r: dict[str, Any], batch: str | None = None) -> list[str]:
    """One table row of a merged level (`merge`); `batch` when its mean batch is known."""
    lat = r["latency_seconds"] or {}
    return [
        name,
        level,
        str(r["ok"]),
        str(sum(r["errors"].values())),
        fmt(r["images_per_second"], 2),
        _ms(lat.get("p50")),
        _ms(lat.get("p99")),
        batch or fmt(r.get("mean_batch_images"), 2),
    ]


def table_rows(t: dict[str, Any]) -> list[list[str]]:
    # Level by level, each server in turn: qdserve, qdserve-uncached, litserve, ...
    names = [n for n in SERVERS if n in t["levels"]]
    levels = list(t["levels"][table_ours_present(t)[0]])
    rows = [
        level_row(name, conc, t["levels"][name][conc])
        for conc in levels
        for name in names
        if conc in t["levels"][name]
    ]
    lone = t["direct"].get("1", {}).get("in_rounds")
    if lone:
        name = "direct pipeline call, batch 1, in the concurrency-1 rounds"
        rows.append(level_row(name, "1", lone, batch="1"))
    for batch, d in t["direct"].items():
        s = d["seconds_per_call"]
        rows.append(
            [
                f"direct pipeline call, batch {batch} (ceiling)",
                "-",
                str(d["calls"]),
                "0",
                fmt(d["images_per_second"], 2),
                _ms(s["p50"]),
                _ms(s["p99"]),
                batch,
            ]
        )
    return rows


def time_notes(t: dict[str, Any]) -> list[str]:
    """Where a lone request's time goes beyond the direct call (runs before these fields
    existed have none)."""
    direct = t["direct"].get("1", {})
    mine = uncached_of(t)
    lone = t["levels"][mine].get("1", {}).get("mean_timings_seconds")
    notes = []
    if "png_b64_seconds" in direct:
        notes.append(
            f"Encoding one answer image (PNG level 1 as qdserve does, then base64) took "
            f"{fmt(direct['png_b64_seconds'] * 1e3, 1)} ms in the bench process: every server "
            "pays it (LitServe at Pillow's default level), a direct call does not."
        )
    if lone:
        notes.append(
            f"{mine}'s own timings at concurrency 1 (mean): "
            + ", ".join(
                f"{k.removesuffix('_seconds')} {fmt(lone[k] * 1e3, 1)} ms"
                for k in ("queue_seconds", "inference_seconds", "encode_seconds")
            )
            + "; the rest of its latency is HTTP, base64 and JSON."
        )
    pairs = t.get("paired_c1")
    if pairs:
        paired_name = pairs.get("server", QDSERVE)
        notes.append(
            f"Paired at concurrency 1 ({pairs['pairs']} pairs: a direct batch-1 call and "
            f"the same request to {paired_name} over HTTP, in alternating order, the other "
            "servers paused): p50 direct "
            f"{_ms(pairs['direct_seconds']['p50'])} ms, {paired_name} "
            f"{_ms(pairs['qdserve_seconds']['p50'])} ms, **{paired_name} / direct "
            f"{fmt(pairs['p50_qdserve_over_direct'], 3)}**."
        )
    return notes


def table_peer_names(t: dict[str, Any]) -> list[str]:
    return [n for n in PEERS if n in t["levels"]]


def table_ours_present(t: dict[str, Any]) -> list[str]:
    return [n for n in OURS if n in t["levels"]]


def uncached_of(t: dict[str, Any]) -> str:
    """The qdserve server of a table doing a direct call's work: uncached where it ran (older
    reports' `qdserve` ran uncached)."""
    return QDSERVE_UNCACHED if QDSERVE_UNCACHED in t["levels"] else QDSERVE


def ratio_header(t: dict[str, Any], mine: str = QDSERVE) -> list[str]:
    cols = ["concurrency"]
    for peer in table_peer_names(t):
        cols += [f"img/s {mine}/{peer}", f"p50 {mine}/{peer}", f"p99 {mine}/{peer}"]
    return [*cols, f"p50 {mine} / direct batch 1"]


def ratio_rows(t: dict[str, Any], mine: str = QDSERVE) -> list[list[str]]:
    rows = []
    mk = peer_key(mine)
    for conc, r in t["ratios"].items():
        row = [conc]
        for peer in table_peer_names(t):
            key = peer_key(peer)
            row += [
                fmt(r.get(f"images_per_second_{mk}_over_{key}"), 2),
                fmt(r.get(f"p50_{mk}_over_{key}"), 2),
                fmt(r.get(f"p99_{mk}_over_{key}"), 2),
            ]
        rows.append([*row, fmt(r.get(f"p50_{mk}_over_direct_batch1"), 3)])
    return rows


def ratio_sections(t: dict[str, Any]) -> list[str]:
    """One ratio table per qdserve server of the table."""
    parts = []
    for mine in table_ours_present(t):
        what = (
            "qdserve with its step cache off, the same work as a peer that caches no step"
            if mine == QDSERVE_UNCACHED
            else "qdserve"
        )
        parts += [
            f"Ratios ({mine} / peer: img/s > 1 and latency < 1 favour {what}):",
            md_table(ratio_header(t, mine), ratio_rows(t, mine)),
        ]
    return parts


QUALITY_HEADER = ["server", "images", "adherence", "mean PSNR (dB)", "min PSNR (dB)", "identical"]


def quality_section(t: dict[str, Any]) -> list[str]:
    """The quality rows of a table that measured them (`answer_quality`)."""
    q = t.get("quality")
    if not q:
        return []
    ref = next(iter(q.values())).get("reference")
    rows = [
        [
            name,
            str(r["images"]),
            fmt(100 * r["adherence"], 1) + "%" if r.get("adherence") is not None else "-",
            "identical" if r.get("identical") == r["images"] else fmt(r.get("psnr_mean_db"), 1),
            fmt(r.get("psnr_min_db"), 1),
            str(r.get("identical", "-")),
        ]
        for name, r in q.items()
    ]
    return [
        f"Quality of the answers, measured in the same run (the demo prompt set at seed "
        f"{QUALITY_SEED}, 4 requests at a time; PSNR against {ref}'s answer to the same "
        "request, the uncached image; identical images count as 100 dB in the mean; "
        "adherence: the demo checker finds every shape, color and position the prompt names):",
        md_table(QUALITY_HEADER, rows),
    ]


def render(data: dict[str, Any]) -> str:
    opts, peer = data["options"], data["peer"]
    variant = data["variant"]
    # Reports written before GPU runs existed carry neither field: they ran on the CPU.
    device = data.get("device", {"kind": "cpu", "name": "cpu"})
    auto = f"auto: {data.get('qdserve_auto_batch', AUTO_MAX_BATCH_CPU)} on {device['kind']}"
    request = f"{opts.get('size') or 32}x{opts.get('size') or 32}, " + (
        f"{opts['steps']} steps" if opts.get("steps") else "the model's default steps"
    )
    # Reports from before distinct prompts sent one prompt to every request.
    prompts = ", a distinct prompt per request" if data.get("distinct_prompts") else ""
    parts = [
        f"# qdserve vs LitServe, side by side ({'unquantized' if variant == 'none' else variant})",
        meta_line(data["meta"]),
        "Which server is which:\n\n"
        "- **qdserve**: `qdserve serve` (this project), started with only the pipeline "
        "settings in its environment (`QDS_MODEL`, `QDS_QUANT_BACKEND`, `QDS_QUANT_TYPE`, "
        "`QDS_GGUF_FILE`), plus `QDS_TORCH_THREADS` in the pinned table; every other setting "
        "at its default"
        + (
            f" (its step cache included: `QDS_STEP_CACHE={cache}`)"
            if (cache := data.get("qdserve_step_cache"))
            else ""
        )
        + ".\n"
        + (
            "- **qdserve-uncached**: the same with `QDS_STEP_CACHE=off`: every denoiser step "
            "runs, the same work as a peer that caches no step (the only server of the other "
            "tables).\n"
            if any(QDSERVE_UNCACHED in t["levels"] for t in data["tables"].values())
            else ""
        )
        + f"- **litserve**: LitServe {peer['version']}, `{peer['code']}`: a `LitAPI` around the "
        "same `load_pipeline` / `generate_batch`, LitServe's batching as in its docs' typical "
        f"example (max_batch_size {peer['max_batch_size']}, batch_timeout "
        f"{peer['batch_timeout_s']} s), one worker, everything else at LitServe's defaults "
        "(`torch.set_num_threads` only in the pinned table).\n"
        + (
            "- **litserve-compiled**: the same LitServe server with the one line a user would "
            "add to compile the denoiser, `pipe.transformer.compile()` in `setup`, then one "
            f"call at every batch size 1..{peer['max_batch_size']} at the bench's size and "
            "steps before it reports ready (its compile time is start-up, not measured; "
            "defaults table only).\n"
            if any(LITSERVE_COMPILED in t["levels"] for t in data["tables"].values())
            else ""
        )
        + (
            "- **litserve-taylorseer**: the same LitServe server with the one line a user "
            f"would add to cache steps, `{peer['taylorseer']['line']}` in `setup` (diffusers' "
            "hook, qdserve's default parameters; LitServe batches whole calls, so every "
            "sample of a batch is at the same step, which the hook assumes; defaults table "
            "only).\n"
            if any(LITSERVE_TAYLORSEER in t["levels"] for t in data["tables"].values())
            else ""
        )
        + "- **direct pipeline call**: `generate_batch` in the benchmark process, no HTTP: a plain "
        "diffusers call (text encoders on every call, `no_grad`; qdserve's engine keeps a "
        "prompt-embedding cache and runs under `inference_mode`), at "
        f"batch 1, {LITSERVE_MAX_BATCH} and qdserve's `QDS_MAX_BATCH` ({auto}; a table says "
        "its own where it differs), with the "
        "table's thread count, after the servers have stopped: the ceiling of a server "
        "batching that far."
        + (
            " At batch 1 it is also a third contender in the concurrency-1 rounds (same "
            "seconds, same seeds, both servers paused): `p50 qdserve / direct batch 1` "
            "compares with that one."
            if any(t["direct"].get("1", {}).get("in_rounds") for t in data["tables"].values())
            else ""
        ),
        f"Device: {device['kind']} ({device['name']}).",
        f"Both servers load the same pipeline folder (`{data['model_folder']}`) with the same "
        f"quantization (`{variant}`) and get the same requests (OpenAI images JSON, b64 PNG, "
        f"same seeds, {request}{prompts}): concurrency {', '.join(map(str, opts['concurrency']))}; "
        "per level "
        f"{opts['rounds']} interleaved round(s) of {opts['seconds']:g} s per server after an "
        "untimed warm-up, the server not being measured paused (SIGSTOP). img/s: images "
        "answered over the summed wall time; p50/p99 over every request of the level."
        + (
            f" Open-loop level(s) in the defaults table ({', '.join(map(open_level, rates))}):"
            " requests arrive as a Poisson process at that rate for the round's seconds, "
            "each sent at its time whatever is still unanswered, the same arrival times for "
            "both servers; their img/s is capped by the rate, so latency is their result."
            if (rates := opts.get("rates"))
            else ""
        ),
    ]
    for name, t in data["tables"].items():
        threads = t["torch_threads"]
        server_threads = ", ".join(
            f"{n} {threads.get(n, threads['litserve'])}"
            for n in (*table_ours_present(t), *table_peer_names(t))
        )
        parts += [
            f"## {TITLES[name]}",
            f"torch threads: {server_threads}, "
            f"direct call {threads['direct']}. LitServe max_batch_size "
            f"{t.get('litserve_max_batch', peer['max_batch_size'])}; qdserve "
            f"`QDS_MAX_BATCH` at its default (auto: "
            f"{t.get('qdserve_auto_batch', data.get('qdserve_auto_batch', AUTO_MAX_BATCH_CPU))}"
            f" on {device['kind']}).",
            md_table(HEADER, table_rows(t)),
            *time_notes(t),
            *ratio_sections(t),
            *quality_section(t),
            "Start-up and memory: "
            + "; ".join(
                f"{n} {fmt(i['start_to_ready_seconds'], 1)} s to ready, "
                + (
                    f"RSS {i['memory_after_run']['rss_bytes'] / 2**20:.0f} MiB over "
                    f"{i['memory_after_run']['processes']} process(es)"
                    if i.get("memory_after_run")
                    else "memory -"
                )
                for n, i in t["servers"].items()
            )
            + ".",
        ]
    return "\n\n".join(parts) + "\n"


def headline(data: dict[str, Any]) -> str:
    parts = []
    for name, t in data["tables"].items():
        per_peer = []
        for mine in OURS:
            for peer in PEERS:
                key = f"images_per_second_{peer_key(mine)}_over_{peer_key(peer)}"
                ratios_ = ", ".join(
                    f"c{c} {fmt(r[key], 2)}"
                    for c, r in t["ratios"].items()
                    # open-loop levels run at a set rate: latency is their result
                    if c.isdigit() and key in r
                )
                if ratios_:
                    per_peer.append(f"img/s {mine}/{peer} {ratios_}")
        parts.append(f"{name}: " + "; ".join(per_peer))
    return f"{data['variant']}: " + "; ".join(parts)


def command_line(argv: Sequence[str], quick: bool) -> str:
    return " ".join(["qdserve bench peer", *(["--quick"] if quick else []), *argv])


def main(argv: Sequence[str], out: Path, quick: bool) -> dict[str, Any]:
    opts = parse_options(argv, quick)
    meta = run_meta(command_line(argv, quick), torch_threads=opts.pinned_threads)
    with tempfile.TemporaryDirectory(prefix="qds-peer-") as tmp:
        data = {"meta": meta, **measure(opts, Path(tmp))}
    meta["torch_threads"] = {
        name: t["torch_threads"][table_ours_present(t)[0]] for name, t in data["tables"].items()
    }
    data["headline"] = headline(data)
    write_json(out / f"{opts.slug}.json", data)
    (out / f"{opts.slug}.md").write_text(render(data))
    return data
