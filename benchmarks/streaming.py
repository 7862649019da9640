"""Streaming costs on the embedded model: what `stream: true` with `partial_images=2` adds to a
request's total time, what one preview costs the engine, and how long after a client leaves
the device is free.

    qdserve bench streaming [--quick] [--out DIR]   (or python -m benchmarks.streaming)

Writes streaming.json and streaming.md (default docs/benchmarks/). Three parts:

1. end to end, `qdserve serve` in its own process at its defaults (the engine in its own
   process), interleaved rounds of: the JSON answer, the stream with partial_images=0, the
   stream with partial_images=2; client time to the final image decoded;
2. one preview (`StepBatch.latents_preview`: a VAE decode of the predicted x0) against one
   denoising step, in this process on the same model;
3. disconnect -> device free: a server in this process (its engine still in its own
   process), QDS_MAX_BATCH=1; a streamed 200-step request is abandoned after step 5 while a
   second request waits behind it. Measured from the client closing its connection to the
   engine's `Cancelled` event (the request is out of the batch: no further step runs it) and
   to the waiting request's `Started` event, both on this process's clock.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_OUT,
    PROMPT,
    TORCH_THREADS,
    free_port,
    md_table,
    meta_line,
    qdserve_server,
    run_meta,
    summarize,
    write_json,
)

SIZE = 32
BUDGET = 0.05  # the bound: streaming adds under 5% at partial_images=2


# -- 1. end to end ------------------------------------------------------------------------------
def _json_request(client: Any, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = client.post(url, json=body)
    r.raise_for_status()
    base64.b64decode(r.json()["data"][0]["b64_json"])
    return time.perf_counter() - t0


def _stream_request(client: Any, url: str, body: dict[str, Any]) -> tuple[float, int]:
    """Client time to the completed event's image decoded, and the partial images seen."""
    t0 = time.perf_counter()
    partials = 0
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                base64.b64decode(data["b64_json"])
                if event == "image_generation.partial_image":
                    partials += 1
                elif event == "image_generation.completed":
                    break
    return time.perf_counter() - t0, partials


def _server_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by the server and its children (the engine)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _bootstrap_median(values: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the median."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    meds = np.median(rng.choice(data, size=(n, len(data)), replace=True), axis=1)
    return [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]


def end_to_end(rounds: int, log_dir: Path) -> dict[str, Any]:
    import httpx

    server = qdserve_server("qdserve-streaming", log_dir)
    assert server.proc is not None
    pid = server.proc.pid
    url = "/v1/images/generations"
    arms = ("json", "stream_p0", "stream_p2")
    times: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    partials_seen: list[int] = []
    try:
        with httpx.Client(base_url=server.base_url, timeout=300.0) as client:
            base = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"}
            for i in range(3):  # warm-up: first calls, allocator, encoders, the preview fit
                _json_request(client, url, {**base, "seed": i})
                _stream_request(
                    client, url, {**base, "seed": i, "stream": True, "partial_images": 2}
                )
            for i in range(rounds):
                order = arms[i % 3 :] + arms[: i % 3]  # rotate which arm goes first
                for arm in order:
                    body = {**base, "seed": 1000 + i}
                    before = _server_cpu(pid)
                    if arm == "json":
                        times[arm].append(_json_request(client, url, body))
                    else:
                        p = 2 if arm == "stream_p2" else 0
                        seconds, seen = _stream_request(
                            client, url, {**body, "stream": True, "partial_images": p}
                        )
                        times[arm].append(seconds)
                        if p:
                            partials_seen.append(seen)
                    cpu[arm].append(_server_cpu(pid) - before)
    finally:
        server.stop()

    def paired(series: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
        # Per round (the three arms back to back): robust to the shared CPUs' slow drifts.
        ratios = [x / y for x, y in zip(series[a], series[b], strict=True)]
        return {**summarize(ratios), "median_ci95": _bootstrap_median(ratios)}

    return {
        "rounds": rounds,
        "size": f"{SIZE}x{SIZE}",
        "steps": "model default (12 for the demo weights)",
        "seconds": {a: summarize(v) for a, v in times.items()},
        "server_cpu_seconds": {a: summarize(v) for a, v in cpu.items()},
        "per_round_seconds": times,
        "per_round_server_cpu_seconds": cpu,
        "ratio_stream_p2_to_json": paired(times, "stream_p2", "json"),
        "ratio_stream_p0_to_json": paired(times, "stream_p0", "json"),
        "ratio_stream_p2_to_stream_p0": paired(times, "stream_p2", "stream_p0"),
        "cpu_ratio_stream_p2_to_json": paired(cpu, "stream_p2", "json"),
        "cpu_ratio_stream_p0_to_json": paired(cpu, "stream_p0", "json"),
        "total_time_ratio_stream_p2_to_json": sum(times["stream_p2"]) / sum(times["json"]),
        # Sums: CPU times come in 10 ms clock ticks, too coarse for one request's ratio.
        "total_cpu_ratio_stream_p2_to_json": sum(cpu["stream_p2"]) / sum(cpu["json"]),
        "total_cpu_ratio_stream_p0_to_json": sum(cpu["stream_p0"]) / sum(cpu["json"]),
        "partials_seen": {str(k): partials_seen.count(k) for k in sorted(set(partials_seen))},
        "server": {"argv": " ".join(server.argv[1:]), "env": server.env},
    }


# -- 2. one preview vs one step ------------------------------------------------------------------
def preview_cost(reps: int) -> dict[str, Any]:
    import torch

    from pipelines import previews
    from pipelines.generate import GenerationRequest, resolve
    from pipelines.loader import load_pipeline
    from pipelines.stepping import StepBatch
    from quantization.settings import QuantSettings

    torch.set_num_threads(TORCH_THREADS)
    loaded = load_pipeline(QuantSettings())
    rows = []
    for size, n in ((32, 1), (64, 1), (32, 4)):
        batch = StepBatch(loaded, max_images=n)
        total = 3 * reps + 2
        req = resolve(
            loaded.defaults,
            GenerationRequest(
                PROMPT, seed=1, width=size, height=size, num_inference_steps=total, num_images=n
            ),
        )
        batch.add("job", req)
        batch.step()
        # Let the pipeline's preview map learn (real decodes) before timing it.
        while not previews._fit(loaded.pipeline, 16).ready:
            batch.latents_preview("job")
        batch.latents_preview("job")  # the map's first call (kernel set-up) is not timed
        steps, maps, decodes = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            batch.step()
            t1 = time.perf_counter()
            batch.latents_preview("job")
            t2 = time.perf_counter()
            job = batch._jobs["job"]  # what latents_preview decodes while still learning
            with torch.no_grad():
                x0 = job.latents - job.sigmas[job.step] * job.velocity
                batch._decode(x0, req)
            t3 = time.perf_counter()
            steps.append(t1 - t0)
            maps.append(t2 - t1)
            decodes.append(t3 - t2)
        step_ms = summarize(steps)["median"] * 1e3
        map_ms = summarize(maps)["median"] * 1e3
        decode_ms = summarize(decodes)["median"] * 1e3
        rows.append(
            {
                "size": f"{size}x{size}",
                "images": n,
                "step_ms_median": step_ms,
                "preview_map_ms_median": map_ms,
                "preview_decode_ms_median": decode_ms,
                "map_over_step": map_ms / step_ms,
                "decode_over_step": decode_ms / step_ms,
                "steps_per_request": loaded.defaults.steps,
                "two_map_previews_over_request": 2 * map_ms / (step_ms * loaded.defaults.steps),
                "two_decode_previews_over_request": 2
                * decode_ms
                / (step_ms * loaded.defaults.steps),
            }
        )
    loaded.release()
    return {"reps": reps, "rows": rows}


# -- 3. disconnect -> device free ---------------------------------------------------------------
def disconnect(trials: int, cache_dir: Path) -> dict[str, Any]:
    import httpx
    import uvicorn

    from engine import messages as m
    from quantization.settings import QuantSettings
    from service.app import create_app
    from service.server import uvicorn_config
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        engine="process",
        max_batch=1,
        torch_threads=TORCH_THREADS,
        max_steps=1000,
        log_level="WARNING",
    )
    app = create_app(QuantSettings(cache_dir=cache_dir), settings)
    qds = app.state.qds
    arrivals: dict[tuple[str, str], float] = {}
    on_event = qds.engine._on_event  # timestamp engine events as they reach the HTTP side

    def timed(event: object) -> None:
        if isinstance(event, m.Cancelled | m.Started):
            arrivals[(type(event).__name__, event.job_id)] = time.perf_counter()
        on_event(event)

    qds.engine._on_event = timed  # type: ignore[method-assign]
    submitted: list[str] = []
    submit = qds.engine.submit

    def recording_submit(*args: Any, **kw: Any) -> Any:
        job = submit(*args, **kw)
        submitted.append(job.job_id)
        return job

    qds.engine.submit = recording_submit  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    results: list[dict[str, float]] = []
    try:
        with httpx.Client(base_url=base, timeout=300.0) as client:
            while not server.started or client.get("/readyz").status_code != 200:
                if not thread.is_alive():
                    raise RuntimeError("the in-process server exited during start-up")
                time.sleep(0.2)
            for trial in range(trials + 1):  # the first is a warm-up
                submitted.clear()
                done: dict[str, Any] = {}

                def second(done: dict[str, Any] = done) -> None:
                    with httpx.Client(base_url=base, timeout=300.0) as c:
                        done["r"] = c.post(
                            "/v1/generate",
                            json={"prompt": "a blue square", "num_inference_steps": 2},
                        )

                waiter = threading.Thread(target=second)
                step_times: list[float] = []
                body = {"prompt": PROMPT, "num_inference_steps": 200, "stream": True, "seed": trial}
                with client.stream("POST", "/v1/generate", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        step = json.loads(line[6:])["step"]
                        step_times.append(time.perf_counter())
                        if waiter.ident is None:
                            waiter.start()
                        if step >= 5 and len(submitted) == 2:
                            break
                    t0 = time.perf_counter()
                # The connection is closed: the client is gone.
                waiter.join(120)
                first, queued = submitted
                cancelled = arrivals.get(("Cancelled", first))
                started = arrivals.get(("Started", queued))
                if trial == 0 or cancelled is None or started is None:
                    continue
                gaps = [b - a for a, b in itertools.pairwise(step_times)]
                results.append(
                    {
                        "disconnect_to_cancelled_s": cancelled - t0,
                        "disconnect_to_next_started_s": started - t0,
                        "step_s": summarize(gaps)["median"] if gaps else float("nan"),
                    }
                )
    finally:
        server.should_exit = True
        thread.join(60)
    return {
        "trials": len(results),
        "runs": results,
        "disconnect_to_cancelled_s": summarize([r["disconnect_to_cancelled_s"] for r in results]),
        "disconnect_to_next_started_s": summarize(
            [r["disconnect_to_next_started_s"] for r in results]
        ),
        "step_s": summarize([r["step_s"] for r in results]),
        "setup": "QDS_ENGINE=process, QDS_MAX_BATCH=1, 32x32, streamed request of 200 steps "
        "abandoned after its 5th progress event; a 2-step request waiting behind it",
    }


# -- report --------------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> str:
    e = data["end_to_end"]
    s = e["seconds"]
    rows = [
        [
            arm,
            f"{s[arm]['median'] * 1e3:.1f}",
            f"{s[arm]['p25'] * 1e3:.1f}",
            f"{s[arm]['p75'] * 1e3:.1f}",
            f"{e['server_cpu_seconds'][arm]['median'] * 1e3:.1f}",
        ]
        for arm in ("json", "stream_p0", "stream_p2")
    ]
    r2, r0, r20 = (
        e["ratio_stream_p2_to_json"],
        e["ratio_stream_p0_to_json"],
        e["ratio_stream_p2_to_stream_p0"],
    )
    c2, c0 = e["cpu_ratio_stream_p2_to_json"], e["cpu_ratio_stream_p0_to_json"]
    ratio = r2["median"]
    verdict = "under" if ratio - 1 < BUDGET else "OVER"
    ci = r2["median_ci95"]
    p = data["preview_cost"]["rows"]
    prow = [
        [
            r["size"],
            r["images"],
            f"{r['step_ms_median']:.2f}",
            f"{r['preview_map_ms_median']:.2f}",
            f"{r['preview_decode_ms_median']:.2f}",
            f"{100 * r['two_map_previews_over_request']:.1f}%",
            f"{100 * r['two_decode_previews_over_request']:.1f}%",
        ]
        for r in p
    ]
    d = data["disconnect"]
    drows = [
        [k, f"{d[k]['median'] * 1e3:.1f}", f"{d[k]['p75'] * 1e3:.1f}", f"{d[k]['max'] * 1e3:.1f}"]
        for k in ("disconnect_to_cancelled_s", "disconnect_to_next_started_s", "step_s")
    ]
    return (
        "\n\n".join(
            [
                "# Streaming: overhead, preview cost, disconnect to device free",
                meta_line(data["meta"]),
                f"## End to end ({e['rounds']} interleaved rounds, {e['size']}, {e['steps']})",
                "`qdserve serve` at its defaults (engine in its own process) on loopback; client "
                "time until the final image is decoded. json: the plain answer; stream_p0 / "
                "stream_p2: `stream: true` with partial_images 0 / 2, every event read and its "
                "image decoded.",
                md_table(["arm", "median ms", "p25 ms", "p75 ms", "server CPU ms (median)"], rows),
                "Ratios per round (the three arms back to back, the first arm rotating), median "
                "with its 95% bootstrap interval and quartiles over the rounds; wall time as the "
                "client sees it, and CPU time of the server's processes (HTTP and engine), which "
                "the other work on these shared CPUs disturbs far less:",
                md_table(
                    ["ratio", "median", "95% interval of the median", "p25", "p75"],
                    [
                        [
                            name,
                            f"{r['median']:.3f}",
                            f"{r['median_ci95'][0]:.3f} - {r['median_ci95'][1]:.3f}",
                            f"{r['p25']:.3f}",
                            f"{r['p75']:.3f}",
                        ]
                        for name, r in (
                            ("wall: stream_p2 / json", r2),
                            ("wall: stream_p0 / json", r0),
                            ("wall: stream_p2 / stream_p0", r20),
                            ("server CPU: stream_p2 / json", c2),
                            ("server CPU: stream_p0 / json", c0),
                        )
                    ],
                ),
                f"**stream with partial_images=2 / json, wall time: {ratio:.3f}** (95% interval "
                f"{ci[0]:.3f} - {ci[1]:.3f}; {verdict} the 5% budget at the median). Totals over "
                f"all rounds: wall time {e['total_time_ratio_stream_p2_to_json']:.3f}, server "
                f"CPU time {e['total_cpu_ratio_stream_p2_to_json']:.3f} (stream_p0: "
                f"{e['total_cpu_ratio_stream_p0_to_json']:.3f}; CPU times are counted in 10 ms "
                f"ticks, so the totals are the finer measure). Partial images seen per "
                f"stream_p2 request: {e['partials_seen']}.",
                "## One preview against one denoising step (engine side, this process)",
                "`StepBatch.latents_preview` on the predicted clean latents x0 = x - sigma * v "
                "(no denoiser forward), rendered by pipelines.previews: the linear latent -> "
                "RGB map fitted to the pipeline's VAE (`map`), or a real VAE decode (`decode`), "
                "what a preview costs while that fit is still learning (the first few requests of "
                "a freshly loaded pipeline; the end-to-end server above learnt it in its warm-up). "
                "The HTTP process then encodes each preview like a final image (PNG level 1) and "
                "sends it; that cost is inside the end-to-end numbers above. The last columns: two "
                "previews as a share of a default request's denoising time.",
                md_table(
                    [
                        "size",
                        "images",
                        "step ms",
                        "map ms",
                        "decode ms",
                        "2 map previews",
                        "2 decode previews",
                    ],
                    prow,
                ),
                f"## Disconnect to device free ({d['trials']} trials)",
                d["setup"] + ". Times from the client closing its connection (same clock: the "
                "server runs in the benchmark process, its engine in a child process).",
                md_table(["interval", "median ms", "p75 ms", "max ms"], drows),
                "disconnect_to_cancelled: the engine has removed the request from its batch (no "
                "further step runs it); disconnect_to_next_started: the waiting request has joined "
                "a batch (its first step runs next). At most one step that was already running "
                "when the client left completes first (tests/integration/test_streaming.py counts "
                "it).",
            ]
        )
        + "\n"
    )


def headline(data: dict[str, Any]) -> str:
    e, d = data["end_to_end"], data["disconnect"]
    maps = [r["two_map_previews_over_request"] for r in data["preview_cost"]["rows"]]
    return (
        f"stream with 2 partial images / JSON {e['ratio_stream_p2_to_json']['median']:.3f} wall "
        f"(median of {e['rounds']} paired rounds), {e['total_cpu_ratio_stream_p2_to_json']:.3f} "
        f"server CPU (total); 2 previews <= {100 * max(maps):.1f}% of a "
        f"request's steps; disconnect -> device free "
        f"{d['disconnect_to_cancelled_s']['median'] * 1e3:.0f} ms median "
        f"(step {d['step_s']['median'] * 1e3:.0f} ms)"
    )


def run(out: Path, quick: bool, command: str = "qdserve bench streaming") -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="qds-streaming-") as tmp:
        data: dict[str, Any] = {"meta": run_meta(command + (" --quick" if quick else ""))}
        data["end_to_end"] = end_to_end(6 if quick else 60, Path(tmp))
        data["preview_cost"] = preview_cost(5 if quick else 20)
        data["disconnect"] = disconnect(3 if quick else 10, Path(tmp) / "models")
    data["headline"] = headline(data)
    write_json(out / "streaming.json", data)
    (out / "streaming.md").write_text(render(data))
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = run(args.out, args.quick, "python -m benchmarks.streaming")
    print(render(data))
    return data


if __name__ == "__main__":
    main()
