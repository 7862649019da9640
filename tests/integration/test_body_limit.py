"""Request body limit (QDS_MAX_BODY_BYTES / QDS_MAX_UPLOAD_BYTES) against a real uvicorn server.

Defect: a 1.5 GB JSON body was read whole (RSS 0.67 -> 5 GB) before its 400. The limit must
refuse with 413 while the body streams in, before anything buffers it.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from test_service_support import Server, running_server

from quantization.backends import ModelLoadError

MIB = 1024 * 1024
IMG = "/v1/images/generations"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    # The model never loads (the loader waits, then fails): the limit needs no model, and a
    # load running in the background would blur the memory measurement.
    release = threading.Event()

    def setup(qds) -> None:
        def no_model(_settings):
            release.wait(120)
            raise ModelLoadError("this test serves no model")

        qds.load = no_model

    with running_server(
        cache_dir,
        wait_ready=False,
        setup=setup,
        max_body_bytes=MIB,
        max_upload_bytes=4 * MIB,
    ) as s:
        yield s
        release.set()


def _memory_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def _raw_request(
    server: Server,
    head: dict[str, str],
    chunks: Iterable[bytes] = (),
    *,
    chunked: bool = False,
) -> tuple[http.client.HTTPResponse, bytes, int]:
    """Send a request by hand (so the body can be chunked, or declared and never sent) while
    a second thread reads the answer as soon as it comes; returns the response, its body and
    the body bytes that were sent before the server stopped taking them."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    lines = [f"POST {IMG} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer: dict[str, object] = {}

    def read() -> None:
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        answer["resp"], answer["body"] = resp, resp.read()

    reader = threading.Thread(target=read)
    reader.start()
    sent = 0
    try:
        for chunk in chunks:
            if "resp" in answer:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: what a refused upload looks like
    reader.join(60)
    sock.close()
    assert "resp" in answer, "no response"
    return answer["resp"], answer["body"], sent  # type: ignore[return-value]


def _json_prompt_body(total: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """`{"prompt": "xxxx..."}` of `total` bytes, generated chunk by chunk (never held whole)."""
    yield b'{"prompt": "'
    left = total - len(b'{"prompt": ""}')
    while left > 0:
        n = min(chunk, left)
        yield b"x" * n
        left -= n
    yield b'"}'


def test_chunked_body_over_limit_is_413_without_buffering(server: Server) -> None:
    total = 64 * MIB
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    before = _memory_kb("VmRSS")
    resp, body, sent = _raw_request(
        server,
        {"Content-Type": "application/json", "X-Request-ID": "big-1"},
        _json_prompt_body(total),
        chunked=True,
    )
    peak_growth = (_memory_kb("VmHWM") - before) * 1024
    print(f"sent {sent / MIB:.1f} MiB of {total / MIB:.0f}; peak RSS +{peak_growth / MIB:.1f} MiB")
    assert resp.status == 413, body
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert f"QDS_MAX_BODY_BYTES={MIB}" in err["message"]
    assert err["request_id"] == "big-1" and resp.getheader("x-request-id") == "big-1"
    # The server stopped taking the body long before its end (socket buffers aside) and
    # never held it: the old code grew by more than the body (64 MiB) before its 400.
    assert sent < total
    assert peak_growth < 16 * MIB, f"peak RSS grew {peak_growth / MIB:.1f} MiB"


def test_declared_length_over_limit_is_refused_before_the_body(server: Server) -> None:
    # The body is never sent: the answer must come from the headers alone.
    resp, body, _ = _raw_request(
        server, {"Content-Type": "application/json", "Content-Length": str(1536 * MIB)}
    )
    assert resp.status == 413
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large"
    assert f"QDS_MAX_BODY_BYTES={MIB}" in err["message"] and "1610612736" in err["message"]


def test_multipart_has_its_own_larger_limit(server: Server) -> None:
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    resp, body, _ = _raw_request(server, {**form, "Content-Length": str(5 * MIB)})
    assert resp.status == 413
    assert f"QDS_MAX_UPLOAD_BYTES={4 * MIB}" in json.loads(body)["error"]["message"]
    # 2 MiB: over the JSON limit, under the upload limit, so not refused for its size (this
    # endpoint takes JSON, so it is a 400 of another kind).
    resp, body, _ = _raw_request(
        server,
        {**form, "Content-Length": str(2 * MIB)},
        iter([b"-" * (2 * MIB)]),
    )
    assert resp.status == 400, body
    assert json.loads(body)["error"]["code"] != "request_too_large"


def test_body_under_limit_still_reaches_validation(server: Server) -> None:
    with server.client() as c:
        r = c.post(IMG, json={"prompt": "x", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
