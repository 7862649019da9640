"""The public HTTP contract against a real uvicorn server: OpenAI client, native endpoint,
models, validation (exact status, param and code), errors, request ids, metrics."""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_service_support import Server, running_server

from service import metric_names

MODEL = "qdserve/embedded-flux"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir,
        max_pixels=64 * 64,
        max_steps=8,
        max_images=4,
        max_prompt_chars=50,
        max_queue=32,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator:
    with server.client() as c:
        yield c


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def test_openai_client_two_images_differ_and_seed_reproduces(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    kw = dict(model=MODEL, prompt="a red circle", n=2, size="32x32", response_format="b64_json")
    first = client.images.generate(**kw, extra_body={"seed": 42})
    assert len(first.data) == 2
    imgs = [_png(d.b64_json) for d in first.data]
    assert all(img.size == (32, 32) for img in imgs)
    # Each image has its own seed (request seed + i), so the images differ.
    assert [d.model_extra["seed"] for d in first.data] == [42, 43]
    assert first.data[0].b64_json != first.data[1].b64_json
    assert first.model_extra["backend"] == "none"
    # Same request seed: the same bytes.
    again = client.images.generate(**kw, extra_body={"seed": 42})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]
    # No seed: a random one, returned so the image can be reproduced.
    rnd = client.images.generate(model=MODEL, prompt="a red circle", n=1)
    seed = rnd.data[0].model_extra["seed"]
    rep = client.images.generate(model=MODEL, prompt="a red circle", n=1, extra_body={"seed": seed})
    assert rep.data[0].b64_json == rnd.data[0].b64_json


@pytest.mark.parametrize(
    ("fmt", "content_type", "pil"),
    [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")],
)
def test_native_generate_formats(http, fmt: str, content_type: str, pil: str) -> None:
    body = {"prompt": "a blue square", "seed": 7, "output_format": fmt, "width": 32, "height": 32}
    if fmt != "png":
        body["output_compression"] = 80
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == content_type
    img = Image.open(io.BytesIO(r.content))
    assert img.format == pil and img.size == (32, 32)
    assert r.headers["x-seed"] == "7"
    assert r.headers["x-backend"] == "none"
    assert float(r.headers["x-inference-seconds"]) > 0
    assert "inference;dur=" in r.headers["server-timing"]


def test_openai_image_equals_native_image_with_same_seed(http) -> None:
    a = http.post("/v1/images/generations", json={"prompt": "a star", "seed": 11, "size": "32x32"})
    b = http.post("/v1/generate", json={"prompt": "a star", "seed": 11})
    assert base64.b64decode(a.json()["data"][0]["b64_json"]) == b.content


def test_models_lists_default_loaded(http) -> None:
    data = http.get("/v1/models").json()
    assert data["object"] == "list"
    card = data["data"][0]
    assert card["id"] == MODEL and card["loaded"] and card["default"]
    assert card["backend"] == "none" and card["storage_bytes"] > 0
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/v1/models/nope").status_code == 404


def test_health_and_ready(http) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_openapi_docs(http) -> None:
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/generate", "/v1/models"} <= set(spec["paths"])


IMG = "/v1/images/generations"
GEN = "/v1/generate"


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        (IMG, {"prompt": "x", "size": "big"}, 400, "size", "invalid_size"),
        (IMG, {"prompt": "x", "size": "0x32"}, 400, "size", "invalid_size"),
        (IMG, {"prompt": "x", "size": "128x128"}, 400, "size", "size_too_large"),
        (IMG, {"prompt": "x", "size": "34x32"}, 400, "size", "invalid_size"),
        (
            IMG,
            {"prompt": "x", "num_inference_steps": 0},
            400,
            "num_inference_steps",
            "invalid_value",
        ),
        (
            IMG,
            {"prompt": "x", "num_inference_steps": 9},
            400,
            "num_inference_steps",
            "invalid_value",
        ),
        (IMG, {"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
        (IMG, {"prompt": "x", "n": 5}, 400, "n", "invalid_value"),
        (IMG, {"prompt": "x", "n": "two"}, 400, "n", "invalid_value"),
        (IMG, {"n": 1}, 400, "prompt", "missing_required_parameter"),
        (IMG, {"prompt": "  "}, 400, "prompt", "invalid_value"),
        (IMG, {"prompt": "x" * 51}, 400, "prompt", "prompt_too_long"),
        (
            IMG,
            {"prompt": "x", "negative_prompt": "y" * 51},
            400,
            "negative_prompt",
            "prompt_too_long",
        ),
        (IMG, {"prompt": "x", "output_format": "gif"}, 400, "output_format", "invalid_value"),
        (
            IMG,
            {"prompt": "x", "output_compression": 101},
            400,
            "output_compression",
            "invalid_value",
        ),
        (
            IMG,
            {"prompt": "x", "response_format": "url"},
            400,
            "response_format",
            "unsupported_response_format",
        ),
        (IMG, {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", "invalid_value"),
        (IMG, {"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
        (IMG, {"prompt": "x", "model": "dall-e-3"}, 404, "model", "model_not_found"),
        (IMG, {"prompt": "x", "quant_backend": "nope"}, 400, "quant_backend", "invalid_value"),
        (
            IMG,
            {"prompt": "x", "quant_backend": "quanto", "quant_type": "int7"},
            400,
            "quant_type",
            "invalid_value",
        ),
        (IMG, {"prompt": "x", "quant_backend": "quanto"}, 400, "quant_backend", "model_not_loaded"),
        (
            IMG,
            {"prompt": "x", "model": f"{MODEL}:torchao:int8wo"},
            400,
            "quant_backend",
            "model_not_loaded",
        ),
        (GEN, {"prompt": "x", "width": 34, "height": 32}, 400, "width", "invalid_size"),
        (GEN, {"prompt": "x", "width": 128, "height": 128}, 400, "width", "size_too_large"),
        (GEN, {"prompt": "x", "width": -32, "height": 32}, 400, "width", "invalid_size"),
        (GEN, {"prompt": "x", "height": 31}, 400, "height", "invalid_size"),
        (GEN, {"prompt": "x", "output_format": "bmp"}, 400, "output_format", "invalid_value"),
        (GEN, {"prompt": "x", "stepz": 3}, 400, "stepz", "invalid_value"),
    ],
)
def test_validation(http, path: str, body: dict, status: int, param: str, code: str) -> None:
    r = http.post(path, json=body, headers={"X-Request-ID": "val-1"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["message"] and err["request_id"] == "val-1"
    assert r.headers["x-request-id"] == "val-1"


def test_not_loaded_lists_what_is_loaded(http) -> None:
    r = http.post(IMG, json={"prompt": "x", "quant_backend": "quanto"})
    assert f"{MODEL}:none" in r.json()["error"]["message"]


def test_invalid_json_and_unknown_path(http) -> None:
    r = http.post(IMG, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.headers["x-request-id"]


def test_request_id_echo_and_generated(http) -> None:
    r = http.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    # Unsafe ids (spaces, too long) are replaced, not echoed into logs.
    assert http.get("/v1/models", headers={"X-Request-ID": "a b"}).headers["x-request-id"] != "a b"


def test_sixteen_concurrent_requests_never_overlap(server: Server) -> None:
    scheduler = server.qds.scheduler
    finished_before = scheduler.finished_jobs

    def one(i: int) -> int:
        with server.client() as c:
            r = c.post(IMG, json={"prompt": f"shape {i}", "seed": i, "size": "32x32"})
            return r.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(16)))
    assert statuses == [200] * 16
    assert scheduler.finished_jobs - finished_before == 16
    # Requests share the device through step batches, never through two steps at once: the
    # scheduler counts steps running at once and never saw two.
    assert scheduler.max_concurrent == 1


def test_internal_error_is_500_with_request_id(server: Server, http, caplog) -> None:
    def boom(_batch) -> None:
        raise RuntimeError("secret internal detail")

    server.qds.scheduler.before_batch = boom
    try:
        with caplog.at_level(logging.ERROR, logger="qdserve"):
            r = http.post(IMG, json={"prompt": "x"}, headers={"X-Request-ID": "err-42"})
    finally:
        server.qds.scheduler.before_batch = None
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["request_id"] == "err-42" and err["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert any("err-42" in rec.getMessage() for rec in caplog.records)
    # Still serving.
    assert http.post(IMG, json={"prompt": "x"}).status_code == 200


def test_oom_is_503_frees_and_keeps_serving(server: Server, http) -> None:
    # Fault injection: the worker hook raises the error CUDA would (no GPU here).
    def oom(_batch) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    server.qds.scheduler.before_batch = oom
    try:
        r = http.post(IMG, json={"prompt": "x"})
    finally:
        server.qds.scheduler.before_batch = None
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "out_of_memory" and "out of memory" in err["message"]
    assert http.post(IMG, json={"prompt": "x"}).status_code == 200
    assert "qds_gpu_oom_total 1.0" in http.get("/metrics").text


def test_metrics_exports_exactly_the_contract(http) -> None:
    http.post(IMG, json={"prompt": "x"})
    families = {f.name for f in text_string_to_metric_families(http.get("/metrics").text)}
    # The parser names counters without _total.
    ours = {f for f in families if f.startswith("qds_")}
    expected = {
        n.removesuffix("_total")
        for n in metric_names.ALL
        if n not in metric_names.GPU_GAUGES or torch.cuda.is_available()
    }
    assert ours == expected
    assert "process_resident_memory_bytes" in families
    text = http.get("/metrics").text
    assert 'qds_requests_total{endpoint="/v1/images/generations",status="200"}' in text
    assert 'qds_images_generated_total{backend="none"}' in text
    assert "qds_model_ready 1.0" in text


def test_loop_stays_responsive_during_inference(server: Server, http) -> None:
    gate = threading.Event()
    server.qds.scheduler.before_batch = lambda _b: gate.wait(10)
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: server.client().post(IMG, json={"prompt": "x"}))
            # While the worker is busy, the event loop still answers at once.
            for _ in range(5):
                assert http.get("/healthz", timeout=2).status_code == 200
            gate.set()
            assert fut.result(timeout=30).status_code == 200
    finally:
        server.qds.scheduler.before_batch = None
        gate.set()


def test_pixels_of_images_are_not_constant(http) -> None:
    r = http.post(IMG, json={"prompt": "x", "seed": 1})
    arr = np.asarray(_png(r.json()["data"][0]["b64_json"]))
    assert arr.std() > 0
