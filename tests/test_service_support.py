"""Helpers for the service tests: a real uvicorn server on a loopback ephemeral port.

(Named test_service_* so it belongs with the service tests; it holds no tests itself.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from quantization.settings import QuantSettings
from service.app import create_app
from service.engine import ServiceState
from service.server import server_for
from service.settings import ServiceSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app: Any, port: int, settings: ServiceSettings) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # The configuration `qdserve serve` runs with (graceful-shutdown timeout included).
        self.server = server_for(app, settings, host="127.0.0.1", port=port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def qds(self) -> ServiceState:
        return self.app.state.qds

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                r = c.get("/readyz")
                if r.status_code == 200:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready: {r.text}")
                time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def running_server(
    cache_dir: Path,
    *,
    quant: dict[str, Any] | None = None,
    wait_ready: bool = True,
    setup: Callable[[ServiceState], None] | None = None,
    **service: Any,
) -> Iterator[Server]:
    """Start create_app(...) under uvicorn in a thread; yield once listening (and ready)."""
    # One torch thread: the test machines share 2 cores between several processes, where
    # OpenMP's spinning threads make a 2-thread generation ~35x slower than a 1-thread one.
    service.setdefault("torch_threads", 1)
    # The engine core on a thread of this process, so tests can reach its scheduler and cache
    # and set hooks that cannot be pickled; tests/integration/test_engine_core.py covers
    # engine="process".
    service.setdefault("engine", "inline")
    # QDS_COMPILE=auto compiles on this CPU (seconds of warm-up per server start); the tests
    # that are about compiling ask for it, the rest run the eager blocks.
    service.setdefault("compile", False)
    # QDS_STEP_CACHE's default (fbcache:0.2) is off here: tests compare served images with the
    # pipeline's own uncached call of the same seed; tests about the cache ask for it.
    service.setdefault("step_cache", "off")
    settings = ServiceSettings(**service)
    app = create_app(QuantSettings(cache_dir=cache_dir, **(quant or {})), settings)
    if setup is not None:
        setup(app.state.qds)
    server = Server(app, free_port(), settings)
    server.thread.start()
    try:
        server.wait_listening()
        if wait_ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()
