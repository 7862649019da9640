"""QDS_SHUTDOWN_TIMEOUT reaches uvicorn as given: 0 = do not wait, 0.5 = half a second.

Defect: `int(timeout) or None` turned 0 and every sub-second value into None, which uvicorn
reads as "wait for in-flight requests forever". The test servers now run with the same
`uvicorn_config()` as `qdserve serve`, so they cannot hide such a difference again.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from test_service_support import running_server

from quantization.backends import ModelLoadError
from service.server import uvicorn_config
from service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("seconds", [0, 0.5, 30])
def test_uvicorn_gets_the_timeout_as_given(seconds: float) -> None:
    config = uvicorn_config(
        object(), ServiceSettings(shutdown_timeout=seconds), host="127.0.0.1", port=8000
    )
    assert config.timeout_graceful_shutdown == seconds


def _no_model(qds) -> None:
    # Shutdown is what is tested: no model, so nothing loads in the background.
    def fail(_settings):
        raise ModelLoadError("this test serves no model")

    qds.load = fail


@pytest.mark.parametrize("seconds", [0, 0.5])
def test_shutdown_stops_waiting_for_a_stuck_request(cache_dir: Path, seconds: float) -> None:
    with running_server(
        cache_dir, wait_ready=False, setup=_no_model, shutdown_timeout=seconds
    ) as server:
        # A request whose body never completes stays in flight until it is cancelled.
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        state = server.server.server_state
        deadline = time.monotonic() + 10
        while not state.tasks:  # uvicorn starts the request's task once the headers are in
            assert time.monotonic() < deadline, "the request never reached the app"
            time.sleep(0.01)
        server.server.should_exit = True  # what SIGTERM does
        # A hang guard, not a timing: with "wait forever" the server never stops while the
        # stuck request's connection is open.
        server.thread.join(20)
        stopped = not server.thread.is_alive()
        sock.close()
        assert stopped, f"QDS_SHUTDOWN_TIMEOUT={seconds} waited for the stuck request"
