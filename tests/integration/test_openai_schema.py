"""qdserve's Images API responses and stream events against OpenAI's published schemas
(vendored in tests/schemas/openai/, source and version in its README), and the token counts
that fill `usage`.

The one departure allowed, explicitly: `size` may be any `WxH` qdserve served, where OpenAI
enumerates a few sizes. Every other schema error fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from engine.keys import ModelKey
from pipelines.generate import GenerationRequest
from pipelines.loader import ModelDefaults
from pipelines.token_usage import TokenUsage, count_usage, image_tokens, text_tokens
from service.protocol import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
    ImagesUsage,
    Timings,
)
from service.responses import images_response

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas" / "openai"
SCHEMAS: dict[str, Any] = json.loads((SCHEMA_DIR / "images.json").read_text())
SERVED_SIZE = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")


def _validator(name: str) -> Draft202012Validator:
    # The document carries components.schemas, so the spec's own "#/components/schemas/..."
    # references resolve inside it unchanged.
    schema = {"components": SCHEMAS["components"], "$ref": f"#/components/schemas/{name}"}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _is_size_extension(error: ValidationError, served: str | None) -> bool:
    """OpenAI's size enum refusing the WxH qdserve actually served: the documented extension."""
    return (
        error.validator == "enum"
        and list(error.absolute_path) == ["size"]
        and isinstance(error.instance, str)
        and SERVED_SIZE.match(error.instance) is not None
        and error.instance == served
    )


def schema_errors(instance: dict[str, Any], name: str) -> list[str]:
    """Every error of `instance` against OpenAI's schema `name`, the size extension aside.

    A stream-event union (anyOf + discriminator on `type`) is checked against the member the
    discriminator names, as a client generated from the spec dispatches.
    """
    schema = SCHEMAS["components"]["schemas"][name]
    if "discriminator" in schema:
        members = [m["$ref"].rsplit("/", 1)[1] for m in schema["anyOf"]]
        matching = [
            m
            for m in members
            if instance.get("type")
            in SCHEMAS["components"]["schemas"][m]["properties"]["type"]["enum"]
        ]
        assert len(matching) == 1, f"type {instance.get('type')!r} names none of {members}"
        name = matching[0]
    served = instance.get("size")
    return [
        f"{list(e.absolute_path)}: {e.message}"
        for e in _validator(name).iter_errors(instance)
        if not _is_size_extension(e, served)
    ]


def assert_openai(instance: dict[str, Any], name: str) -> None:
    assert schema_errors(instance, name) == [], json.dumps(instance)[:500]


# -- the vendored files ---------------------------------------------------------------------


def test_vendored_schemas_name_their_source_and_hold_what_we_validate() -> None:
    source = SCHEMAS["source"]
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert source["commit"] in readme and source["info.version"] in readme
    names = set(SCHEMAS["components"]["schemas"])
    assert {
        "ImagesResponse",
        "Image",
        "ImageGenUsage",
        "ImagesUsage",
        "ImageGenPartialImageEvent",
        "ImageGenCompletedEvent",
        "ImageGenStreamEvent",
        "ImageEditPartialImageEvent",
        "ImageEditCompletedEvent",
        "ImageEditStreamEvent",
    } <= names
    # Everything referenced is vendored too.
    refs = re.findall(r'"#/components/schemas/([A-Za-z0-9_]+)"', json.dumps(SCHEMAS))
    assert set(refs) <= names


def test_the_check_is_not_loose() -> None:
    """Wrong types, missing required fields and a null where a string belongs all fail; a
    size outside the enum passes only when it is the WxH served."""
    good = {"created": 1, "data": [{"b64_json": "AA=="}], "size": "1024x1024"}
    assert schema_errors(good, "ImagesResponse") == []
    assert schema_errors({**good, "created": "1"}, "ImagesResponse")
    assert schema_errors({"data": []}, "ImagesResponse")
    assert schema_errors(
        {**good, "data": [{"b64_json": "AA==", "revised_prompt": None}]}, "ImagesResponse"
    )
    assert schema_errors({**good, "size": "32x32"}, "ImagesResponse") == []
    assert schema_errors({**good, "size": "big"}, "ImagesResponse")
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    assert schema_errors({**good, "usage": usage}, "ImagesResponse")  # no input_tokens_details
    event = {"type": "image_generation.partial_image", "b64_json": "AA==", "created_at": 1}
    assert schema_errors(event, "ImageGenStreamEvent")  # size, quality, ... missing


# -- our models -----------------------------------------------------------------------------

USAGE = TokenUsage(text_tokens=4, image_tokens=0, output_tokens=8192)


def _outcome(width: int, height: int, n: int = 2, quant_type: str | None = None) -> Any:
    return SimpleNamespace(
        key=ModelKey("qdserve/embedded-flux", "none", quant_type, "float32"),
        images=[b"\x89PNG" + bytes([i]) for i in range(n)],
        seeds=[7 + i for i in range(n)],
        width=width,
        height=height,
        steps=4,
        queue_seconds=0.001,
        inference_seconds=0.5,
        encode_seconds=0.002,
        batch_images=n,
        usage=USAGE,
    )


def _dump(model: Any) -> dict[str, Any]:
    # What the routes send: None fields left out (response_model_exclude_none).
    return json.loads(model.model_dump_json(exclude_none=True))


@pytest.mark.parametrize("size", [(1024, 1024), (1536, 1024), (32, 32), (48, 64)])
def test_images_response_validates(size: tuple[int, int]) -> None:
    body = _dump(images_response(_outcome(*size), "png", "qdserve/embedded-flux"))
    assert_openai(body, "ImagesResponse")
    assert body["usage"] == {
        "input_tokens": 4,
        "output_tokens": 8192,
        "total_tokens": 8196,
        "input_tokens_details": {"text_tokens": 4, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 8192, "text_tokens": 0},
    }
    assert "revised_prompt" not in body["data"][0] and "quant_type" not in body
    assert [d["seed"] for d in body["data"]] == [7, 8]
    assert set(body["timings"]) == {
        "queue_seconds",
        "inference_seconds",
        "encode_seconds",
        "batch_images",
    }


def test_images_response_keeps_quant_type_when_set() -> None:
    body = _dump(images_response(_outcome(32, 32, quant_type="int8"), "webp", "m"))
    assert body["quant_type"] == "int8" and body["output_format"] == "webp"
    assert_openai(body, "ImagesResponse")


@pytest.mark.parametrize(
    ("cls", "union"),
    [
        (ImageGenPartialImageEvent, "ImageGenStreamEvent"),
        (ImageEditPartialImageEvent, "ImageEditStreamEvent"),
    ],
)
@pytest.mark.parametrize("size", ["1024x1024", "32x32"])
def test_partial_image_events_validate(cls: type, union: str, size: str) -> None:
    event = cls(
        b64_json="AA==",
        created_at=1,
        size=size,
        output_format="png",
        partial_image_index=1,
        index=0,
        seed=3,
        step=2,
        total_steps=4,
    )
    assert_openai(_dump(event), union)
    assert_openai(_dump(event), cls.__name__)


@pytest.mark.parametrize(
    ("cls", "union"),
    [
        (ImageGenCompletedEvent, "ImageGenStreamEvent"),
        (ImageEditCompletedEvent, "ImageEditStreamEvent"),
    ],
)
@pytest.mark.parametrize("size", ["1024x1536", "64x32"])
def test_completed_events_validate(cls: type, union: str, size: str) -> None:
    event = cls(
        b64_json="AA==",
        created_at=1,
        size=size,
        output_format="jpeg",
        index=1,
        seed=3,
        usage=ImagesUsage.of(USAGE),
        model="qdserve/embedded-flux",
        backend="none",
        timings=Timings(
            queue_seconds=0.0, inference_seconds=1.0, encode_seconds=0.1, batch_images=1
        ),
    )
    body = _dump(event)
    assert_openai(body, union)
    assert_openai(body, cls.__name__)
    assert body["usage"]["input_tokens_details"] == {"text_tokens": 4, "image_tokens": 0}


# -- token counts on the real embedded pipeline ---------------------------------------------


@pytest.fixture(scope="module")
def flux(embedded_path: Path) -> Iterator[Any]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(embedded_path))
    yield SimpleNamespace(
        pipeline=pipe,
        defaults=ModelDefaults(
            size=32, steps=4, guidance=3.5, size_multiple=4, max_sequence_length=32
        ),
    )


def test_text_tokens_are_the_t5_sequence_not_clip(flux: Any) -> None:
    pipe = flux.pipeline
    # T5 (tokenizer_2): three whole words and the end-of-sequence token.
    assert pipe.tokenizer_2("a red circle")["input_ids"][-1] == pipe.tokenizer_2.eos_token_id
    assert text_tokens(pipe, "a red circle", 32) == 4
    # CLIP would have counted characters plus two special tokens: not what is reported.
    assert len(pipe.tokenizer("a red circle")["input_ids"]) == 12
    # Truncated where the pipeline truncates (max_sequence_length).
    assert text_tokens(pipe, "x" * 600, 32) == 32
    assert text_tokens(pipe, "x" * 600, 16) == 16


def test_image_tokens_are_the_packed_latent_sequence(flux: Any) -> None:
    import torch

    pipe = flux.pipeline
    for width, height in [(32, 32), (64, 32), (48, 16)]:
        latents, _ = pipe.prepare_latents(
            1, 16 // 4, height, width, torch.float32, torch.device("cpu"), None
        )
        # One token per packed 2x2 latent patch: (H / 16) * (W / 16) on a real Flux VAE,
        # (H / 4) * (W / 4) on the embedded model's 2x VAE.
        assert image_tokens(pipe, width, height) == latents.shape[1] == (width // 4) * (height // 4)


def test_count_usage_of_a_request(flux: Any) -> None:
    req = GenerationRequest("a red circle", width=64, height=32, num_images=3)
    assert count_usage(flux, req) == TokenUsage(text_tokens=4, image_tokens=0, output_tokens=384)
    neg = GenerationRequest("a red circle", negative_prompt="blue", width=32, height=32)
    assert count_usage(flux, neg) == TokenUsage(text_tokens=4 + 2, image_tokens=0, output_tokens=64)
    edit = count_usage(flux, req, input_sizes=[(32, 32)])
    assert edit.image_tokens == 64 and edit.input_tokens == 68 and edit.total_tokens == 68 + 384


# -- the real server ------------------------------------------------------------------------

MODEL = "qdserve/embedded-flux"


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Any]:
    from test_service_support import running_server

    with running_server(cache_dir, max_pixels=64 * 64, max_images=4, max_steps=8) as s:
        yield s


def test_served_response_validates_and_counts_real_tokens(server: Any) -> None:
    body = {"model": MODEL, "prompt": "a red circle", "n": 2, "size": "32x32", "seed": 3}
    with server.client() as http:
        r = http.post("/v1/images/generations", json={**body, "num_inference_steps": 2})
        neg = http.post(
            "/v1/images/generations",
            json={
                **body,
                "n": 1,
                "size": "64x32",
                "negative_prompt": "blue",
                "num_inference_steps": 2,
            },
        )
    assert r.status_code == 200, r.text
    data = r.json()
    assert_openai(data, "ImagesResponse")
    # "a red circle": 3 T5 tokens + end-of-sequence; 32x32 on the 2x VAE, 2x2 packed: 8 * 8
    # latent patches per image, two images.
    assert data["usage"] == {
        "input_tokens": 4,
        "output_tokens": 128,
        "total_tokens": 132,
        "input_tokens_details": {"text_tokens": 4, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 128, "text_tokens": 0},
    }
    assert "revised_prompt" not in data["data"][0] and "quant_type" not in data
    assert data["size"] == "32x32" and data["backend"] == "none"
    assert data["timings"]["batch_images"] >= 2 and data["timings"]["inference_seconds"] > 0
    # A negative prompt is encoded and attended to too ("blue" + end-of-sequence).
    assert neg.status_code == 200, neg.text
    assert_openai(neg.json(), "ImagesResponse")
    assert neg.json()["usage"]["input_tokens_details"]["text_tokens"] == 4 + 2
    assert neg.json()["usage"]["output_tokens"] == 16 * 8


def test_openai_client_parses_usage_typed(server: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    resp = client.images.generate(
        model=MODEL, prompt="a red circle", size="32x32", extra_body={"num_inference_steps": 2}
    )
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (
        4,
        64,
        68,
    )
    assert resp.usage.input_tokens_details.text_tokens == 4
    assert resp.data[0].revised_prompt is None and resp.output_format == "png"
