"""Cold start, warm restart and eager baseline of `qdserve serve` (embedded model, defaults):
seconds to /readyz 200 and to `"mode": "compiled"`, then img/s at concurrency 4 and 1 for 15 s.

    .venv/bin/python tools/warm_start.py [cold] [warm] [eager]   (from the checkout root)
    .venv/bin/python tools/warm_start.py container-cold container-warm [IMAGE] [QDS_X=value ...]

One JSON line per run on stdout (docs/benchmarks/warm-start.json holds the recorded ones);
server logs in /tmp/warmexp/<run>.log. `cold` empties its inductor cache first. The container
runs start the image (default `qdserve:cpu`, `docker run --network host`) on a Docker volume
at /data: `container-cold` on a new, empty one, `container-warm` on the one the cold run left;
their times count from `docker run -d` returning (the container created and started), and the
cold one also measures img/s at concurrency 4 while the compile runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

PORT = 8937
BASE = f"http://127.0.0.1:{PORT}"
OUT = "/tmp/warmexp"
CACHE = f"{OUT}/measure-cache"


def get(path: str) -> tuple[int | None, Any]:
    try:
        with urllib.request.urlopen(BASE + path, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except Exception:
        return None, None


def generate(seed: int) -> None:
    body = json.dumps({"prompt": f"a red circle on the left {seed}", "seed": seed}).encode()
    req = urllib.request.Request(BASE + "/v1/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def load(seconds: float, concurrency: int) -> float:
    """Closed-loop clients for `seconds`: images per second."""
    stop = time.monotonic() + seconds
    done = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        k = 0
        while time.monotonic() < stop:
            generate(i * 100000 + k)
            k += 1
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - start)


def wait_ready(start: float, out: dict[str, Any], alive: Any = None, limit: float = 600) -> None:
    """Poll /readyz until 200: seconds since `start` and the mode it names go into `out`."""
    while True:
        code, body = get("/readyz")
        if code == 200:
            out["ready_s"] = round(time.monotonic() - start, 1)
            out["mode_at_ready"] = body["mode"]
            return
        assert (alive is None or alive()) and time.monotonic() - start < limit, "not ready"
        time.sleep(0.1)


def wait_compiled(start: float, out: dict[str, Any], limit: float = 1500) -> None:
    while get("/readyz")[1]["mode"] != "compiled":
        assert time.monotonic() - start < limit, f"not compiled in {limit:g} s"
        time.sleep(0.2)
    out["compiled_s"] = round(time.monotonic() - start, 1)


def run(label: str, env_extra: dict[str, str], compiled: bool = True) -> dict[str, Any]:
    env = dict(os.environ, QDS_PORT=str(PORT), QDS_LOG_FORMAT="text", **env_extra)
    start = time.monotonic()
    out: dict[str, Any] = {"label": label, "load_avg_start": os.getloadavg()[0]}
    with open(f"{OUT}/{label}.log", "w") as log:
        proc = subprocess.Popen(
            [".venv/bin/qdserve", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(start, out, alive=lambda: proc.poll() is None)
            if compiled:
                wait_compiled(start, out, limit=1200)
            generate(1)
            out["img_s_c4"] = round(load(15, 4), 2)
            out["img_s_c1"] = round(load(15, 1), 2)
            with urllib.request.urlopen(BASE + "/metrics") as r:
                out["metrics"] = [
                    line
                    for line in r.read().decode().splitlines()
                    if line.startswith(("qds_serving_mode", "qds_denoiser_forwards"))
                ]
        finally:
            proc.terminate()
            proc.wait(60)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)
    return out


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def run_container(label: str, image: str, volume: str, settings: dict[str, str]) -> dict[str, Any]:
    """One container on `volume`: seconds from `docker run -d` returning to /readyz 200 and to
    mode compiled, img/s while compiling (c4) and once compiled (c4, c1)."""
    name = "qds-warm-measure"
    docker("rm", "-f", name, check=False)
    env = ["-e", f"QDS_PORT={PORT}", "-e", "QDS_LOG_FORMAT=text"]
    for key, value in settings.items():
        env += ["-e", f"{key}={value}"]
    t0 = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:/data", *env, image)
    out: dict[str, Any] = {
        "label": label,
        "image": image,
        "settings": settings,
        "docker_run_s": round(time.monotonic() - t0, 1),
        "load_avg_start": os.getloadavg()[0],
    }
    start = time.monotonic()
    try:
        wait_ready(start, out, limit=900)
        if out["mode_at_ready"] == "compiling":
            out["img_s_c4_while_compiling"] = round(load(10, 4), 2)
        wait_compiled(start, out)
        generate(1)
        out["img_s_c4"] = round(load(15, 4), 2)
        out["img_s_c1"] = round(load(15, 1), 2)
    finally:
        logs = docker("logs", name, check=False)
        with open(f"{OUT}/{label}.log", "w") as f:
            f.write(logs.stdout + logs.stderr)
        docker("rm", "-f", name, check=False)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)
    return out


def main(which: list[str]) -> None:
    os.makedirs(OUT, exist_ok=True)
    settings = dict(w.split("=", 1) for w in which if "=" in w)
    which = [w for w in which if "=" not in w]
    image = next((w for w in which if ":" in w), "qdserve:cpu")
    volume = "qds-warm-measure"
    for what in [w for w in which if ":" not in w] or ["cold", "warm", "eager"]:
        if what == "container-cold":
            docker("volume", "rm", "-f", volume, check=False)
            docker("volume", "create", volume)
            run_container(what, image, volume, settings)
        elif what == "container-warm":
            run_container(what, image, volume, settings)
        if what == "cold":
            subprocess.run(["rm", "-rf", CACHE], check=False)
            run("cold", {"TORCHINDUCTOR_CACHE_DIR": CACHE})
        elif what == "warm":
            run("warm", {"TORCHINDUCTOR_CACHE_DIR": CACHE})
        elif what == "eager":
            run("eager", {"QDS_COMPILE": "false"}, compiled=False)


if __name__ == "__main__":
    main(sys.argv[1:])
