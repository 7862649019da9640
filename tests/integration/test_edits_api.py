"""Image edits against a real uvicorn server on the demo model: the official openai client's
images.edit(), the native /v1/edit, the upload rules as HTTP errors, batching of edits,
metrics and access logs, and a multipart fuzz that must never produce a 5xx."""

from __future__ import annotations

import base64
import io
import logging
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_service_support import Server, running_server
from test_service_worker import Gate, wait_for

from examples.demo import edits_check
from pipelines.demo_checker import adheres

MODEL = "qdserve/embedded-flux"
EDITS = "/v1/images/edits"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir,
        max_pixels=64 * 64,
        max_steps=12,
        max_images=4,
        max_upload_bytes=1024 * 1024,
        max_upload_pixels=256 * 256,
        max_batch=4,
        max_queue=16,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


SOURCE = png(edits_check.source_image())
MASK = png(edits_check.openai_mask())


def decoded(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def post_edit(
    http: httpx.Client, data: dict[str, Any], files: Any = None, path: str = EDITS
) -> httpx.Response:
    if files is None:
        files = {"image": ("in.png", SOURCE, "image/png")}
    return http.post(path, data={k: str(v) for k, v in data.items()}, files=files)


def error_of(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- the official client ------------------------------------------------------------------
def test_openai_client_inpaints_the_demo_image(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    result = client.images.edit(
        model=MODEL,
        image=("red-circle.png", SOURCE, "image/png"),
        mask=("mask.png", MASK, "image/png"),
        prompt=edits_check.INPAINT_PROMPT,
        n=2,
        size="32x32",
        extra_body={"seed": 0, "num_inference_steps": 12},
    )
    assert [d.model_extra["seed"] for d in result.data] == [0, 1]
    first = decoded(result.data[0].b64_json)
    assert first.size == (32, 32)
    # Seed 0 is one of the measured passing seeds (examples/demo/edits_check.py).
    assert adheres(first, edits_check.INPAINT_PROMPT)
    assert result.model_extra["backend"] == "none" and result.size == "32x32"
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens > 0


def test_openai_client_img2img_with_an_image_list(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    # A list of one image: the client sends it as `image[]`.
    result = client.images.edit(
        model=MODEL,
        image=[("red-circle.png", SOURCE, "image/png")],
        prompt=edits_check.KEEP_PROMPT,
        extra_body={"seed": 0, "strength": edits_check.KEEP_STRENGTH, "num_inference_steps": 12},
    )
    img = decoded(result.data[0].b64_json)
    # No size: the input's (32x32); low strength keeps the circle where it was.
    assert img.size == (32, 32) and edits_check.keep_ok(img)


def test_openai_client_sees_a_clear_400(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    no_alpha = png(Image.new("RGB", (32, 32), (0, 0, 0)))
    with pytest.raises(BadRequestError) as info:
        client.images.edit(
            image=("a.png", SOURCE, "image/png"), mask=("m.png", no_alpha), prompt="x"
        )
    err = info.value.body
    assert isinstance(err, dict)
    assert (err["param"], err["code"]) == ("mask", "invalid_mask_image_format")


def test_openai_client_streams_an_edit(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    stream = client.images.edit(
        model=MODEL,
        image=("red-circle.png", SOURCE, "image/png"),
        mask=("mask.png", MASK, "image/png"),
        prompt=edits_check.INPAINT_PROMPT,
        stream=True,
        partial_images=2,
        extra_body={"seed": 0},
    )
    events = list(stream)
    # A whole-call edit has no latent previews: only the completed event.
    assert [e.type for e in events] == ["image_edit.completed"]
    assert adheres(decoded(events[0].b64_json), edits_check.INPAINT_PROMPT)
    assert events[0].usage.input_tokens_details.image_tokens > 0


# -- the native endpoint ------------------------------------------------------------------
def test_native_edit_returns_bytes_with_generate_headers(http: httpx.Client) -> None:
    data = {"prompt": edits_check.RECOLOR_PROMPT, "seed": 0, "strength": 0.6}
    r = post_edit(http, {**data, "output_format": "webp"}, path="/v1/edit")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    assert (r.headers["x-seed"], r.headers["x-width"], r.headers["x-height"]) == ("0", "32", "32")
    # The model's 12 default steps at strength 0.6: 12 - int(12 - 7.2) = 8 run.
    assert r.headers["x-steps"] == "8"
    assert r.headers["x-backend"] == "none" and "inference;dur=" in r.headers["server-timing"]
    # Same seed and fields through the OpenAI endpoint: the same pixels.
    png_native = post_edit(http, data, path="/v1/edit").content
    openai = post_edit(http, data).json()
    assert base64.b64decode(openai["data"][0]["b64_json"]) == png_native
    assert edits_check.recolor_ok(Image.open(io.BytesIO(png_native)))


def test_native_edit_streams_progress_in_the_steps_that_run(http: httpx.Client) -> None:
    data = {"prompt": edits_check.RECOLOR_PROMPT, "seed": 0, "strength": 0.6, "stream": "true"}
    r = post_edit(http, data, path="/v1/edit")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [
        line.removeprefix("event: ") for line in r.text.splitlines() if line.startswith("event:")
    ]
    # 12 steps at strength 0.6 run 8: progress 1..8 of 8, then the image.
    assert events == ["progress"] * 8 + ["completed"], events
    assert '"step":8,"total":8' in r.text


# -- upload rules as HTTP errors ------------------------------------------------------------
def test_mask_rules(http: httpx.Client) -> None:
    def with_mask(mask: bytes) -> dict[str, Any]:
        files = {"image": ("a.png", SOURCE), "mask": ("m.png", mask)}
        return error_of(post_edit(http, {"prompt": "x"}, files))

    err = with_mask(png(Image.new("RGB", (32, 32))))
    assert (err["param"], err["code"]) == ("mask", "invalid_mask_image_format")
    assert "missing alpha channel" in err["message"]
    err = with_mask(png(Image.new("RGBA", (16, 32), (0, 0, 0, 0))))
    assert (err["param"], err["code"]) == ("mask", "invalid_mask_image")
    assert "mask is 16x32 but image is 32x32" in err["message"]


def test_image_rules(http: httpx.Client) -> None:
    gif = png(Image.new("RGB", (32, 32)), "GIF")
    # The name and content type claim PNG: the bytes decide.
    err = error_of(post_edit(http, {"prompt": "x"}, {"image": ("a.png", gif, "image/png")}))
    assert (err["param"], err["code"]) == ("image", "invalid_image_format")
    many = [("image[]", (f"{i}.png", SOURCE)) for i in range(3)]
    err = error_of(post_edit(http, {"prompt": "x"}, many))
    assert (err["param"], err["code"]) == ("image", "too_many_images")
    big = png(Image.new("RGB", (512, 512)))  # 262144 pixels > QDS_MAX_UPLOAD_PIXELS=65536
    err = error_of(post_edit(http, {"prompt": "x"}, {"image": ("a.png", big)}))
    assert (err["param"], err["code"]) == ("image", "image_too_large")
    err = error_of(post_edit(http, {"prompt": "x"}, {"mask": ("m.png", MASK)}))
    assert (err["param"], err["code"]) == ("image", "missing_required_parameter")


def test_field_rules(http: httpx.Client) -> None:
    err = error_of(post_edit(http, {"n": 1}))
    assert (err["param"], err["code"]) == ("prompt", "missing_required_parameter")
    err = error_of(post_edit(http, {"prompt": "x", "strength": 0}))
    assert err["param"] == "strength"
    err = error_of(post_edit(http, {"prompt": "x", "seed": "abc"}))
    assert err["param"] == "seed"
    err = error_of(post_edit(http, {"prompt": "x", "size": "30x30"}))
    assert (err["param"], err["code"]) == ("size", "invalid_size")
    err = error_of(post_edit(http, {"prompt": "x", "n": 5}))
    assert err["param"] == "n" and "QDS_MAX_IMAGES" in err["message"]
    err = error_of(post_edit(http, {"prompt": "x", "bogus": 1}, path="/v1/edit"))
    assert err["param"] == "bogus"
    err = error_of(http.post(EDITS, json={"prompt": "x", "image": "https://x/y.png"}))
    assert err["code"] == "invalid_content_type"


def test_upload_body_limit_is_413(http: httpx.Client) -> None:
    blob = random.Random(0).randbytes(2 * 1024 * 1024)
    r = post_edit(http, {"prompt": "x"}, {"image": ("a.png", blob)})
    err = error_of(r, 413)
    assert "QDS_MAX_UPLOAD_BYTES=1048576" in err["message"]


# -- batching, metrics, logs ----------------------------------------------------------------
def _edit_async(server: Server, data: dict[str, Any], files: Any = None) -> httpx.Response:
    with server.client() as c:
        return post_edit(c, data, files)


def test_compatible_edits_share_a_call_and_never_join_generations(server: Server) -> None:
    scheduler = server.qds.scheduler
    gate = Gate(at=1, pump=scheduler.between_steps)
    scheduler.before_batch = gate
    inpaint_files = {"image": ("a.png", SOURCE), "mask": ("m.png", MASK)}
    base = {"prompt": edits_check.INPAINT_PROMPT, "num_inference_steps": 4, "size": "32x32"}
    start = len(scheduler.step_log)
    try:
        with ThreadPoolExecutor(6) as pool:
            blocker = pool.submit(_edit_async, server, {**base, "seed": 9})
            wait_for(lambda: gate.arrived == 1)
            futures: list[Future] = []
            for args in (
                ({**base, "seed": 1}, inpaint_files),
                ({**base, "seed": 2}, inpaint_files),
                ({**base, "seed": 3, "strength": 0.5}, inpaint_files),  # other strength
                ({**base, "seed": 4}, None),  # img2img: no mask
            ):
                futures.append(pool.submit(_edit_async, server, *args))
                n = len(futures)
                wait_for(lambda n=n: scheduler.depth() == n)
            with server.client() as c:
                gen = pool.submit(
                    c.post, "/v1/images/generations", json={"prompt": "a", "size": "32x32"}
                )
                wait_for(lambda: scheduler.depth() == 5)
                gate.event.set()
                assert blocker.result(120).status_code == 200
                results = [f.result(120) for f in futures]
                generated = gen.result(120)
    finally:
        scheduler.before_batch = None
        gate.event.set()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    batch = [r.json()["timings"]["batch_images"] for r in results]
    # The two compatible inpaints share one call; the other strength and the img2img run
    # alone; the generation never shares a step with an edit.
    assert batch == [2, 2, 1, 1], batch
    assert generated.status_code == 200 and generated.json()["timings"]["batch_images"] == 1
    assert max(len(step) for step in list(scheduler.step_log)[start:]) == 2


def test_edit_metrics_and_access_log(
    http: httpx.Client, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    def count() -> float:
        text = http.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "qds_requests_total" and s.labels == {
                    "endpoint": EDITS,
                    "status": "200",
                }:
                    return s.value
        return 0.0

    before = count()
    with caplog.at_level(logging.INFO, logger="qdserve.access"):
        files = {"image": ("a.png", SOURCE), "mask": ("m.png", MASK)}
        r = post_edit(http, {"prompt": "x", "num_inference_steps": 2, "user": "u1"}, files)
    assert r.status_code == 200, r.text
    assert count() == before + 1
    line = next(rec for rec in caplog.records if getattr(rec, "path", None) == EDITS)
    assert (line.edit, line.input_size, line.user) == ("inpaint", "32x32", "u1")  # type: ignore[attr-defined]


# -- fuzz ------------------------------------------------------------------------------------
def _mutations(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(len(data)) if data else 0
        if op < 0.4 and data:
            data[i] = rng.randrange(256)
        elif op < 0.6:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op < 0.8 and data:
            del data[i : i + rng.randint(1, 64)]
        else:
            data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def test_multipart_fuzz_never_5xx(server: Server) -> None:
    """Seeded mutations of valid edit bodies (byte flips, insertions, cuts, truncation) and of
    their field values: every answer is a 2xx or a 4xx."""
    rng = random.Random(1234)
    mask_img = png(edits_check.openai_mask())
    values = ["", "0", "-1", "1e309", "nan", "x" * 300, "32x32", "0x0", "99999x99999", "true"]
    statuses: dict[int, int] = {}
    with server.client(timeout=120) as c:
        for i in range(150):
            fields = {"prompt": "a", "num_inference_steps": "1", "size": "32x32"}
            if rng.random() < 0.5:
                name = rng.choice(
                    ["n", "size", "strength", "seed", "guidance_scale", "output_format", "prompt"]
                )
                fields[name] = rng.choice(values)
            files = {"image": ("a.png", SOURCE, "image/png")}
            if rng.random() < 0.5:
                files["mask"] = ("m.png", mask_img, "image/png")
            built = c.build_request("POST", EDITS, data=fields, files=files)
            body = built.read()
            if i % 3:
                body = _mutations(rng, body)
            headers = {"content-type": built.headers["content-type"]}
            r = c.post(EDITS if i % 2 else "/v1/edit", content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, r.status_code, r.text)
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0


@pytest.mark.slow  # ~20 s here, most of it spawning the engine process
def test_edit_through_the_engine_process(cache_dir: Path) -> None:
    """QDS_ENGINE=process (the default): the edit (its PIL images included) crosses the pipe
    to the engine process and comes back edited."""
    with running_server(cache_dir, engine="process") as server, server.client() as c:
        files = {"image": ("a.png", SOURCE), "mask": ("m.png", MASK)}
        data = {"prompt": edits_check.INPAINT_PROMPT, "seed": 0}
        r = post_edit(c, data, files, path="/v1/edit")
        assert r.status_code == 200, r.text
        assert edits_check.inpaint_ok(Image.open(io.BytesIO(r.content)))
        assert r.headers["x-steps"] == "12"  # inpaint's default strength 1.0 runs them all


@pytest.mark.slow  # loads five variants of the demo model (~1 min here)
def test_openai_client_edits_on_every_cpu_backend(cache_dir: Path, tmp_path: Path) -> None:
    """none, quanto, torchao, GGUF (the server's default, converted first) and SDNQ: each
    variant serves the inpaint through the official client, and draws the blue square."""
    from pipelines.loader import prepare
    from quantization.settings import QuantSettings

    gguf = prepare(
        QuantSettings.unprepared(quant_backend="gguf", quant_type="Q8_0", cache_dir=cache_dir),
        tmp_path,
    )
    quant = {"quant_backend": "gguf", "quant_type": "Q8_0", "gguf_file": str(gguf.gguf_file)}
    with running_server(
        cache_dir, quant=quant, allow_on_demand_load=True, cache_max_entries=5
    ) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
        for backend, qtype in (
            ("gguf", "Q8_0"),
            ("none", None),
            ("quanto", "int8"),
            ("torchao", "int8wo"),
            ("sdnq", "int8"),
        ):
            extra: dict[str, Any] = {"seed": 0, "quant_backend": backend}
            if qtype:
                extra["quant_type"] = qtype
            result = client.images.edit(
                image=("red-circle.png", SOURCE, "image/png"),
                mask=("mask.png", MASK, "image/png"),
                prompt=edits_check.INPAINT_PROMPT,
                extra_body=extra,
            )
            assert (result.model_extra["backend"], result.model_extra.get("quant_type")) == (
                backend,
                qtype,
            )
            img = decoded(result.data[0].b64_json)
            assert edits_check.inpaint_ok(img), backend
