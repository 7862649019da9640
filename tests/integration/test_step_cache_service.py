"""QDS_STEP_CACHE and the `step_cache` field through a real server on the demo model: the
setting on /v1/models, the field per request (off gives the uncached image, bit-exact), a bad
value a 400 naming the field, and qds_step_cache_blocks_total counting the block runs."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_service_support import Server, running_server


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, step_cache="fbcache:0.3", max_steps=16) as s:
        yield s


def _image(server: Server, **extra: Any) -> np.ndarray:
    body = {"prompt": "a red circle on the left", "size": "32x32", "seed": 1}
    body.update(num_inference_steps=16, **extra)
    with server.client() as c:
        r = c.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int16)


def _blocks(server: Server) -> dict[str, float]:
    with server.client() as c:
        text = c.get("/metrics").text
    found = re.findall(r'^qds_step_cache_blocks_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found}


def test_models_show_the_setting(server: Server) -> None:
    with server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["step_cache"] == "fbcache:0.3"


def test_the_field_per_request_and_the_metric(server: Server) -> None:
    before = _blocks(server)
    cached = _image(server)  # the server's setting
    after = _blocks(server)
    assert after["skipped"] > before.get("skipped", 0.0)
    assert after["computed"] > before.get("computed", 0.0)
    off = _image(server, step_cache="off")
    assert _blocks(server) == after  # uncached requests are not counted
    assert np.abs(off - _image(server, step_cache="fbcache:0")).max() == 0
    assert np.abs(off - cached).max() > 0
    assert np.abs(cached - _image(server, step_cache="fbcache:0.30")).max() == 0
    # TaylorSeer per request: interval 1 is the uncached image; a real interval differs and
    # counts its predicted steps' block runs as skipped.
    assert np.abs(off - _image(server, step_cache="taylorseer:1")).max() == 0
    skipped = _blocks(server)["skipped"]
    assert np.abs(off - _image(server, step_cache="taylorseer:2")).max() > 0
    assert _blocks(server)["skipped"] > skipped


@pytest.mark.parametrize("value", ["fbcache", "fbcache:7", "magcache:0.1", "taylorseer:0.5"])
def test_a_bad_value_is_a_400_naming_the_field(server: Server, value: str) -> None:
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "step_cache": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "step_cache"
