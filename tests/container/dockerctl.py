"""The container tier's handle on Docker: the `docker` / `docker-compose` command lines.

The CLIs rather than the Docker SDK for Python: they are what the README, CI and operators
type, they need no extra dependency, and a failing command's stderr is the error users see.

The tier is opt-in (QDSERVE_CONTAINER_TESTS=1, which `.ci/run` sets after starting the engine and
running `make image`), so `make test` never touches Docker.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("QDSERVE_CONTAINER_TESTS") == "1"
IMAGE = os.environ.get("QDSERVE_TEST_IMAGE", "qdserve:cpu")
BASE_IMAGE = os.environ.get("QDSERVE_BASE_IMAGE", "qdserve-base:bookworm")
SKIP = pytest.mark.skipif(
    not ENABLED,
    reason="container tier: set QDSERVE_CONTAINER_TESTS=1 (needs a Docker engine and `make image`; "
    ".ci/run does both)",
)


# Generous: with the vfs storage driver, creating or removing a container copies or deletes the
# whole image (about a minute for qdserve:cpu on two busy cores).
def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    docker_bin = shutil.which("docker")
    assert docker_bin, "no docker client on PATH (apt-get install docker.io)"
    res = subprocess.run(
        [docker_bin, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_image(tag: str) -> None:
    if docker("image", "inspect", tag, check=False).returncode != 0:
        pytest.fail(f"image {tag} is missing: run `make image` first (.ci/run does)")


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll an outside system (a server, Prometheus) that offers nothing to wait on."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        res = docker("logs", "--tail", "60", self.name, check=False)
        return res.stdout + res.stderr

    def exec(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *cmd, timeout=timeout)

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until /readyz answered 200; fails with the container's log otherwise."""
        start = time.monotonic()

        def ready() -> bool:
            state = self.inspect()["State"]
            if not state["Running"]:
                raise AssertionError(f"{self.name} exited {state['ExitCode']}:\n{self.logs()}")
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200

        try:
            wait_for(ready, timeout, f"{self.name} /readyz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log ---\n{self.logs()}") from None
        return time.monotonic() - start


def run_container(
    image: str,
    env: dict[str, str],
    volume: str | None = None,
    docker_args: tuple[str, ...] = (),
) -> Container:
    """`docker run -d` with port 8000 published on a free loopback port, as the README does."""
    name = unique("qds-test")
    port = free_port()
    args = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    if volume:
        args += ["-v", f"{volume}:/data"]
    docker(*args, *docker_args, image)
    return Container(name, port)


def remove(container: Container) -> None:
    docker("rm", "-f", "-v", container.name, check=False)


@contextmanager
def events(container: Container, event: str) -> Iterator[queue.Queue[str]]:
    """Docker's event stream for one container and event, as a queue of JSON lines: an event
    to wait on instead of polling `docker inspect`."""
    proc = subprocess.Popen(
        [
            "docker",
            "events",
            "--since",
            "0",
            "--filter",
            f"container={container.name}",
            "--filter",
            f"event={event}",
            "--format",
            "{{json .}}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(10)


def compose(
    project: str, env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    compose_bin = shutil.which("docker-compose")
    assert compose_bin, "no docker-compose (apt-get install docker-compose)"
    res = subprocess.run(
        [compose_bin, "-p", project, "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )
    if res.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res
