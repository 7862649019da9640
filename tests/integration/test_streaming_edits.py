"""Streamed image edits: /v1/images/edits answers OpenAI's image_edit.* events (the official
client's `images.edit(..., stream=True)`), validated against OpenAI's schemas."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from test_openai_schema import assert_openai
from test_service_support import Server, running_server
from test_streaming_unit import parse_sse

MODEL = "qdserve/embedded-flux"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, max_pixels=64 * 64, max_steps=12, max_images=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x")


def _source_png() -> bytes:
    from examples.demo import edits_check

    buf = io.BytesIO()
    edits_check.source_image().save(buf, format="PNG")
    return buf.getvalue()


def test_openai_client_streams_an_edit_and_its_events_validate(
    server: Server, client: OpenAI
) -> None:
    """/v1/images/edits streams OpenAI's image_edit.* events. Edits run whole pipeline calls
    (diffusers' img2img / inpaint pipelines; no step loop, so no latents between steps to
    preview): the stream carries the final image only, which OpenAI allows ("the final image
    may be sent before the full number of partial images"), the same bytes as without
    streaming."""
    source = _source_png()
    kw: dict[str, Any] = dict(
        model=MODEL,
        image=("in.png", source, "image/png"),
        prompt="a blue square on the left",
        extra_body={"seed": 5, "num_inference_steps": 4},
    )
    events = list(client.images.edit(**kw, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_edit.completed"]
    assert events[-1].usage.input_tokens_details.image_tokens > 0  # the input image's patches
    plain = client.images.edit(**kw)
    assert plain.data[0].b64_json == events[-1].b64_json
    with server.client() as http:
        r = http.post(
            "/v1/images/edits",
            files={"image": ("in.png", source, "image/png")},
            data={
                "prompt": "a blue square on the left",
                "stream": "true",
                "partial_images": "1",
                "n": "2",
                "seed": "5",
                "num_inference_steps": "4",
            },
        )
    assert r.status_code == 200, r.text
    parsed = parse_sse(r.content)
    assert [e for e, _ in parsed] == ["image_edit.completed"] * 2
    for name, data in parsed:
        assert data["type"] == name
        assert_openai(data, "ImageEditStreamEvent")


def test_native_edit_stream_reports_the_steps_of_a_whole_call_as_they_end(server: Server) -> None:
    """/v1/edit with stream: progress for each denoising step of the pipeline call while it
    runs (not only at its end), then the edited image."""
    with server.client() as http:
        r = http.post(
            "/v1/edit",
            files={"image": ("in.png", _source_png(), "image/png")},
            data={
                "prompt": "a blue square",
                "stream": "true",
                "seed": "2",
                "num_inference_steps": "10",
            },
        )
    assert r.status_code == 200, r.text
    events = parse_sse(r.content)
    progress = [(d["step"], d["total"]) for e, d in events if e == "progress"]
    totals = {t for _, t in progress}
    assert len(totals) == 1
    (total,) = totals
    steps = [s for s, _ in progress]
    assert steps == sorted(set(steps)) and steps[-1] == total
    # Reported during the call: a step before the last one reached the client.
    assert steps[0] < total
    assert events[-1][0] == "completed" and events[-1][1]["steps"] == total
