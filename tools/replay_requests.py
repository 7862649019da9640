#!/usr/bin/env python3
"""Record a fixed, serial list of requests against a real qdserve server, and compare two
recordings: the check that a refactor changed no behaviour a client can see.

    python tools/replay_requests.py record OUT.json [--qdserve PATH] [--port N] [--env K=V]
    python tools/replay_requests.py compare BEFORE.json AFTER.json
    python tools/replay_requests.py replay BEFORE.json [--qdserve PATH] [--port N] [--keep F]

Run it with the checkout's interpreter (`.venv/bin/python`: it needs httpx and Pillow, both
dependencies of qdserve). `record` starts `qdserve serve --port N` on 127.0.0.1 (the embedded
model, default settings except the few fixed in SERVER_ENV, every other inherited QDS_*
variable removed), waits for GET /readyz 200, sends requests_list() one at a time, stops the server
(SIGTERM, then waits) and writes what it saw:

- each request's name, HTTP status, the headers that do not vary run to run and the response
  body: JSON with the volatile values replaced by "<volatile>" (so a field that disappears
  is still noticed), every image (b64_json, or raw bytes from the native endpoints) replaced
  by its format, size, mode, the sha256 of its bytes and of its decoded RGB pixels (and the
  mean of each channel, only to say how far apart two images are);
- for streams, the ordered events (type and non-volatile fields, images hashed as above);
- the metric names of GET /metrics (names, types and label names; no values), read last.

`compare` prints every difference by request and field and exits 1 if there is any. `replay`
records with the environment stored in BEFORE.json into a temporary file (or --keep) and
compares. Requests use fixed seeds and run serially, so a recording is deterministic: two
recordings of the same code compare equal (four did, on 2 shared CPU cores). What varies
or may vary is listed at VOLATILE_KEYS / VOLATILE_HEADERS, `_scrub_path` and
`_summarize_progress`, each with the reason. Request ids are not dropped: every request sends
its own fixed X-Request-ID ("replay-<name>"), so the echoed header and the error bodies'
`request_id` are compared too.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageStat

FORMAT_VERSION = 1
HOST = "127.0.0.1"
MODEL_ID = "qdserve/embedded-flux"  # the embedded model's public id (QDS_MODEL unset)

# The server's environment on top of the inherited one, minus every inherited QDS_* variable
# (a shell's settings must not leak into a recording). Everything else keeps its default.
SERVER_ENV: dict[str, str] = {
    # The shipped demo adapter, declared for the whole run so LoRA requests can be served
    # (adapters are declared at start-up only); the same env every run.
    "QDS_LORAS": "orange",
    # Numerics and start-up independent of the machine's core count and of other load: the
    # default (0: torch's default, the core count) changes the intra-op thread count, which
    # keys dynamo's graphs and splits reductions, and on busy shared cores 2 OpenMP threads
    # can be many times slower. With 1 thread QDS_ENGINE_LANES=auto is 1 lane.
    "QDS_TORCH_THREADS": "1",
    # QDS_COMPILE=auto stays on. Dynamo's automatic-dynamic profile persists between processes
    # in inductor's cache dir by default, so whether a size is compiled static or dynamic
    # (different kernels) would depend on earlier runs, not only on this run's requests
    # (a precaution from torch's documentation, not an observed difference).
    "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO": "0",
    # Any set / dict-of-str ordering in messages fixed from run to run.
    "PYTHONHASHSEED": "0",
}

# JSON keys whose values vary run to run (wall-clock stamps and measured durations, from the
# protocol; with them replaced, repeated recordings compare equal): they are kept as
# "<volatile>" so their presence is still compared.
VOLATILE_KEYS = {
    "created",  # ImagesResponse / model card: wall-clock seconds (card: load time)
    "created_at",  # stream events: wall-clock seconds
    "queue_seconds",  # timings: measured durations
    "inference_seconds",
    "encode_seconds",
    "load_seconds",  # GET /v1/models: each LoRA adapter's measured load time
}
# Response headers that vary run to run (or repeat what is recorded otherwise).
VOLATILE_HEADERS = {
    "date",
    "server-timing",  # durations
    "x-queue-seconds",
    "x-inference-seconds",
    "x-encode-seconds",
    # JSON bodies carry timings of varying length; image bodies are hashed instead.
    "content-length",
}
VOLATILE = "<volatile>"


# -- the requests ----------------------------------------------------------------------------
@dataclass
class Req:
    name: str
    method: str
    path: str
    json: Any = None
    data: dict[str, str] | None = None  # multipart text fields
    files: dict[str, str] | None = None  # multipart file field -> input name (_inputs())
    content: bytes | None = None  # raw body (with content_type)
    content_type: str | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _inputs() -> dict[str, tuple[str, bytes, str]]:
    """The edit uploads, drawn here (deterministic for a given Pillow): name -> (filename,
    bytes, content type). Their hashes are recorded so a changed input is noticed."""

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    scene = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(scene).ellipse((2, 10, 14, 22), fill=(220, 30, 30))
    # Opaque except the right half (alpha 0): the area an inpainting edit repaints.
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((16, 0, 31, 31), fill=(0, 0, 0, 0))
    wide = Image.new("RGB", (48, 32), (240, 240, 240))
    ImageDraw.Draw(wide).rectangle((30, 8, 44, 22), fill=(30, 60, 200))
    jpeg = io.BytesIO()
    wide.save(jpeg, format="JPEG", quality=90)
    return {
        "scene.png": ("scene.png", png(scene), "image/png"),
        "mask.png": ("mask.png", png(mask), "image/png"),
        "wide.jpg": ("wide.jpg", jpeg.getvalue(), "image/jpeg"),
        "mask_48x32.png": ("mask_48x32.png", png(Image.new("RGBA", (48, 32))), "image/png"),
        "not_an_image.png": ("not_an_image.png", b"this is not an image\n", "image/png"),
    }


GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
NATIVE = "/v1/generate"
NATIVE_EDIT = "/v1/edit"
RED = "a red circle on the left"


def requests_list() -> list[Req]:
    """The fixed list, sent in this order. Every image request has a seed."""
    return [
        # -- probes, model list, schema
        Req("healthz", "GET", "/healthz"),
        Req("readyz", "GET", "/readyz"),
        Req("models", "GET", "/v1/models"),
        Req("model_card", "GET", f"/v1/models/{MODEL_ID}"),
        Req("model_card_full_id", "GET", f"/v1/models/{MODEL_ID}:none"),
        Req("openapi", "GET", "/openapi.json"),
        # -- generations, JSON (b64_json)
        Req("gen_png_defaults", "POST", GEN, json={"prompt": RED, "seed": 42}),
        Req(
            "gen_png_n2",
            "POST",
            GEN,
            json={"prompt": "a blue square", "n": 2, "size": "32x32", "seed": 7},
        ),
        Req(
            "gen_png_64x64_steps8",
            "POST",
            GEN,
            json={
                "prompt": "a green triangle in the middle",
                "size": "64x64",
                "num_inference_steps": 8,
                "seed": 11,
            },
        ),
        Req(
            "gen_png_48x32_guidance",
            "POST",
            GEN,
            json={
                "prompt": "a yellow square on the right",
                "size": "48x32",
                "num_inference_steps": 6,
                "guidance_scale": 2.5,
                "seed": 12,
            },
        ),
        Req(
            "gen_png_steps4_bigseed",
            "POST",
            GEN,
            json={"prompt": "a purple circle", "num_inference_steps": 4, "seed": 2**62 + 5},
        ),
        Req(
            "gen_png_size_auto_model",
            "POST",
            GEN,
            json={"prompt": RED, "model": MODEL_ID, "size": "auto", "seed": 43},
        ),
        Req(
            "gen_png_negative_prompt",
            "POST",
            GEN,
            json={"prompt": "a cyan square", "negative_prompt": "a circle", "seed": 3},
        ),
        Req(
            "gen_openai_ignored_fields",
            "POST",
            GEN,
            json={
                "prompt": RED,
                "seed": 42,
                "quality": "high",
                "style": "vivid",
                "background": "auto",
                "moderation": "low",
                "user": "replay",
                "response_format": "b64_json",
            },
        ),
        Req(
            "gen_jpeg_q80",
            "POST",
            GEN,
            json={"prompt": RED, "seed": 42, "output_format": "jpeg", "output_compression": 80},
        ),
        Req(
            "gen_jpeg_default",
            "POST",
            GEN,
            json={"prompt": RED, "seed": 42, "output_format": "jpeg"},
        ),
        Req(
            "gen_webp_q70",
            "POST",
            GEN,
            json={"prompt": RED, "seed": 42, "output_format": "webp", "output_compression": 70},
        ),
        Req(
            "gen_lora_orange",
            "POST",
            GEN,
            json={
                "prompt": "an orange circle on the left",
                "seed": 42,
                "lora": [{"name": "orange", "scale": 1.0}],
            },
        ),
        Req(
            "gen_lora_orange_half_n2",
            "POST",
            GEN,
            json={
                "prompt": "an orange square on the right",
                "seed": 8,
                "n": 2,
                "lora": [{"name": "orange", "scale": 0.5}],
            },
        ),
        Req(
            "gen_lora_scale0",
            "POST",
            GEN,
            json={"prompt": RED, "seed": 42, "lora": [{"name": "orange", "scale": 0.0}]},
        ),
        # The base model again after the adapter was used: README says bit-exact.
        Req("gen_png_defaults_after_lora", "POST", GEN, json={"prompt": RED, "seed": 42}),
        # -- streamed generations (OpenAI's image_generation.* events)
        Req(
            "gen_stream_partial2",
            "POST",
            GEN,
            json={"prompt": RED, "seed": 5, "stream": True, "partial_images": 2},
            stream=True,
        ),
        Req(
            "gen_stream_n2_partial1_jpeg",
            "POST",
            GEN,
            json={
                "prompt": "a blue square",
                "seed": 9,
                "n": 2,
                "stream": True,
                "partial_images": 1,
                "output_format": "jpeg",
            },
            stream=True,
        ),
        Req(
            "gen_stream_partial0",
            "POST",
            GEN,
            json={"prompt": "a green circle", "seed": 6, "stream": True},
            stream=True,
        ),
        # -- native: raw image bytes out, and its progress stream
        Req("native_png", "POST", NATIVE, json={"prompt": RED, "seed": 42}),
        Req(
            "native_webp_48x32",
            "POST",
            NATIVE,
            json={
                "prompt": "a blue square",
                "seed": 7,
                "width": 48,
                "height": 32,
                "output_format": "webp",
                "num_inference_steps": 6,
            },
        ),
        Req(
            "native_jpeg_lora",
            "POST",
            NATIVE,
            json={
                "prompt": "an orange circle",
                "seed": 4,
                "output_format": "jpeg",
                "output_compression": 90,
                "lora": [{"name": "orange"}],
            },
        ),
        Req(
            "native_stream_partial2",
            "POST",
            NATIVE,
            json={"prompt": RED, "seed": 5, "stream": True, "partial_images": 2},
            stream=True,
        ),
        # -- edits (multipart): img2img, inpainting, native bytes, stream
        Req(
            "edit_img2img",
            "POST",
            EDITS,
            data={"prompt": "a blue square on the right", "seed": "3"},
            files={"image": "scene.png"},
        ),
        Req(
            "edit_inpaint_mask_n2",
            "POST",
            EDITS,
            data={"prompt": "a blue square on the right", "seed": "3", "n": "2"},
            files={"image": "scene.png", "mask": "mask.png"},
        ),
        Req(
            "edit_jpeg_in_strength_webp_out",
            "POST",
            EDITS,
            data={
                "prompt": "a blue square on the right",
                "seed": "21",
                "strength": "0.8",
                "num_inference_steps": "10",
                "output_format": "webp",
            },
            files={"image": "wide.jpg"},
        ),
        Req(
            "edit_size_resize_lora",
            "POST",
            EDITS,
            data={
                "prompt": "an orange circle on the left",
                "seed": "22",
                "size": "48x32",
                "lora": json.dumps([{"name": "orange", "scale": 1.0}]),
            },
            files={"image[]": "scene.png"},
        ),
        Req(
            "edit_stream_partial2",
            "POST",
            EDITS,
            data={
                "prompt": "a blue square on the right",
                "seed": "3",
                "stream": "true",
                "partial_images": "2",
                "strength": "1.0",
            },
            files={"image": "scene.png", "mask": "mask.png"},
            stream=True,
        ),
        Req(
            "native_edit_mask",
            "POST",
            NATIVE_EDIT,
            data={"prompt": "a blue square on the right", "seed": "3"},
            files={"image": "scene.png", "mask": "mask.png"},
        ),
        Req(
            "native_edit_stream",
            "POST",
            NATIVE_EDIT,
            data={"prompt": "a blue square", "seed": "3", "stream": "true", "partial_images": "1"},
            files={"image": "scene.png"},
            stream=True,
        ),
        # -- errors: the full error JSON (messages byte for byte)
        Req("err_size_not_multiple", "POST", GEN, json={"prompt": RED, "size": "33x33"}),
        Req("err_size_pattern", "POST", GEN, json={"prompt": RED, "size": "big"}),
        Req("err_size_too_many_pixels", "POST", GEN, json={"prompt": RED, "size": "2048x2048"}),
        Req("err_unknown_model", "POST", GEN, json={"prompt": RED, "model": "no-such-model"}),
        Req("err_n_zero", "POST", GEN, json={"prompt": RED, "n": 0}),
        Req("err_n_over_max_images", "POST", GEN, json={"prompt": RED, "n": 5}),
        Req("err_n_over_schema", "POST", GEN, json={"prompt": RED, "n": 11}),
        Req("err_n_not_int", "POST", GEN, json={"prompt": RED, "n": "two"}),
        Req("err_steps_over_max", "POST", GEN, json={"prompt": RED, "num_inference_steps": 51}),
        Req("err_steps_zero", "POST", GEN, json={"prompt": RED, "num_inference_steps": 0}),
        Req("err_response_format_url", "POST", GEN, json={"prompt": RED, "response_format": "url"}),
        Req("err_output_format", "POST", GEN, json={"prompt": RED, "output_format": "gif"}),
        Req(
            "err_partial_images_4",
            "POST",
            GEN,
            json={"prompt": RED, "stream": True, "partial_images": 4},
        ),
        Req("err_seed_negative", "POST", GEN, json={"prompt": RED, "seed": -1}),
        Req("err_guidance_over", "POST", GEN, json={"prompt": RED, "guidance_scale": 101}),
        Req("err_unknown_lora", "POST", GEN, json={"prompt": RED, "lora": [{"name": "nope"}]}),
        Req(
            "err_lora_scale",
            "POST",
            GEN,
            json={"prompt": RED, "lora": [{"name": "orange", "scale": 5}]},
        ),
        Req("err_quant_backend_unknown", "POST", GEN, json={"prompt": RED, "quant_backend": "foo"}),
        Req(
            "err_quant_backend_not_loaded",
            "POST",
            GEN,
            json={"prompt": RED, "quant_backend": "quanto", "quant_type": "int8"},
        ),
        Req("err_missing_prompt", "POST", GEN, json={"n": 1}),
        Req("err_empty_prompt", "POST", GEN, json={"prompt": ""}),
        Req("err_prompt_too_long", "POST", GEN, json={"prompt": "a" * 2001}),
        Req(
            "err_invalid_json",
            "POST",
            GEN,
            content=b'{"prompt": ',
            content_type="application/json",
        ),
        Req(
            "err_body_too_large",
            "POST",
            GEN,
            content=json.dumps({"prompt": "a" * (1024 * 1024)}).encode(),
            content_type="application/json",
        ),
        Req("err_native_extra_field", "POST", NATIVE, json={"prompt": RED, "n": 2}),
        Req("err_native_bad_width", "POST", NATIVE, json={"prompt": RED, "width": 30}),
        Req("err_edit_no_image", "POST", EDITS, data={"prompt": "x"}, files={}),
        Req(
            "err_edit_not_an_image",
            "POST",
            EDITS,
            data={"prompt": "x"},
            files={"image": "not_an_image.png"},
        ),
        Req(
            "err_edit_mask_size",
            "POST",
            EDITS,
            data={"prompt": "x"},
            files={"image": "scene.png", "mask": "mask_48x32.png"},
        ),
        Req("err_edit_json_body", "POST", EDITS, json={"prompt": "x"}),
        Req("err_unknown_route", "GET", "/v1/nothing-here"),
        Req("err_method_not_allowed", "GET", GEN),
        Req("err_model_card_unknown", "GET", "/v1/models/no-such-model"),
        # -- after everything: the metric names (values vary; names, types and labels do not)
        Req("metrics", "GET", "/metrics"),
    ]


# -- normalizing what came back ---------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_image(data: bytes) -> dict[str, Any]:
    """An image as recorded: its encoding's hash and its pixels' hash (decoded to RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
            return {
                "format": im.format,
                "size": list(im.size),
                "mode": im.mode,
                "sha256_bytes": _sha(data),
                "sha256_rgb": _sha(rgb.tobytes()),
                # Only a hint at how far apart two images are when the hashes differ.
                "mean_rgb": [round(v, 3) for v in ImageStat.Stat(rgb).mean],
            }
    except Exception as exc:  # recorded, not fatal: a broken image is a finding
        return {"undecodable": f"{type(exc).__name__}: {exc}", "sha256_bytes": _sha(data)}


def _scrub_path(text: str) -> str:
    """An absolute path to a file on this machine (the LoRA source in /v1/models) depends on
    where the checkout or the wheel lives: keep its file name only."""
    if text.startswith("/") and os.path.exists(text.split(":", 1)[0]):
        return "<path>/" + os.path.basename(text)
    return text


def normalize(obj: Any) -> Any:
    """JSON with volatile values replaced, images described, local paths scrubbed."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key in VOLATILE_KEYS:
                out[key] = VOLATILE
            elif key == "b64_json" and isinstance(value, str):
                out[key] = {"image": describe_image(base64.b64decode(value))}
            else:
                out[key] = normalize(value)
        return out
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    if isinstance(obj, str):
        return _scrub_path(obj)
    return obj


def kept_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in sorted(headers.items()) if k.lower() not in VOLATILE_HEADERS}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


def metric_names(text: str) -> dict[str, Any]:
    """Prometheus text -> metric family types and, per sample name, its label names."""
    types: dict[str, str] = {}
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if m:
                labels = set(_LABEL.findall(m.group(3) or ""))
                samples.setdefault(m.group(1), set()).update(labels)
    return {
        "families": dict(sorted(types.items())),
        "samples": {name: sorted(labels) for name, labels in sorted(samples.items())},
    }


def _summarize_progress(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """The native stream's `progress` events are coalesced when the writer falls behind (the
    stream buffer keeps only the latest progress, service/streaming.py), so how many come and
    where they fall between the previews depends on timing (read in the code; the recordings
    made here had one per step, but nothing guarantees it). Kept instead: the other events in
    order, and what holds whatever the timing (steps rising, the totals, the last one).
    Previews can be dropped for a slow reader too (one pending at most), but they stay
    compared: this reader is local and fast, and previews come several steps apart."""
    steps = [e["data"] for e in events if e["event"] == "progress"]
    others = [e for e in events if e["event"] != "progress"]
    if not steps:
        return others, None
    numbers = [s.get("step") for s in steps]
    summary = {
        "steps_strictly_increasing": all(
            isinstance(a, int) and isinstance(b, int) and a < b
            for a, b in itertools.pairwise(numbers)
        ),
        "totals": sorted({str(s.get("total")) for s in steps}),
        "last": steps[-1],
        "keys": sorted({k for s in steps for k in s}),
    }
    return others, summary


def parse_sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    name, data = None, []
    for line in lines:
        if line == "":
            if name is not None or data:
                raw = "\n".join(data)
                try:
                    body: Any = normalize(json.loads(raw))
                except ValueError:
                    body = {"raw": raw}
                events.append({"event": name, "data": body})
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        # comments (":") and id/retry lines carry nothing recorded
    if name is not None or data:
        events.append({"event": name, "data": {"raw": "\n".join(data)}, "truncated": True})
    return events


def send(client: httpx.Client, req: Req, inputs: dict[str, tuple[str, bytes, str]]) -> dict:
    headers = {"X-Request-ID": f"replay-{req.name}", **req.headers}
    kwargs: dict[str, Any] = {"headers": headers}
    if req.json is not None:
        kwargs["json"] = req.json
    elif req.content is not None:
        kwargs["content"] = req.content
        headers["Content-Type"] = req.content_type or "application/octet-stream"
    elif req.files:
        kwargs["data"] = req.data
        kwargs["files"] = {k: inputs[v] for k, v in req.files.items()}
    elif req.data is not None:
        # Multipart without a file (httpx would send text fields alone urlencoded).
        boundary = "qds-replay-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in req.data.items()
        ]
        kwargs["content"] = ("".join(parts) + f"--{boundary}--\r\n").encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    rec: dict[str, Any] = {"name": req.name, "method": req.method, "path": req.path}
    with client.stream(req.method, req.path, **kwargs) as resp:
        rec["status"] = resp.status_code
        rec["headers"] = kept_headers(resp.headers)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        if ctype == "text/event-stream":
            events = parse_sse(resp.iter_lines())
            events, progress = _summarize_progress(events)
            rec["events"] = events
            if progress is not None:
                rec["progress"] = progress
            return rec
        body = resp.read()
    if ctype == "application/json":
        try:
            rec["json"] = normalize(json.loads(body))
        except ValueError:
            rec["text"] = body.decode("utf-8", "replace")
    elif ctype.startswith("image/"):
        rec["image"] = describe_image(body)
    elif req.name == "metrics":
        rec["metrics"] = metric_names(body.decode())
    else:
        rec["text"] = body.decode("utf-8", "replace")
    return rec


# -- the server -------------------------------------------------------------------------------
def default_qdserve() -> str:
    beside = Path(sys.executable).parent / "qdserve"
    if beside.exists():
        return str(beside)
    found = shutil.which("qdserve")
    if not found:
        sys.exit("no qdserve executable beside this python or on PATH: pass --qdserve")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDS_")}
    env.update(extra)
    return env


def _git_head(path: str) -> str | None:
    """The commit of the checkout the executable belongs to, when it is in one (meta only)."""
    try:
        where = Path(path).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _stop(proc: subprocess.Popen[bytes], timeout: float = 90.0) -> int:
    """SIGTERM, wait; SIGKILL (the server's own process group) only if it does not stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    return proc.returncode


def record(out: Path, qdserve: str, port: int | None, env_extra: dict[str, str], ready_s: float):
    if not (os.path.isfile(qdserve) and os.access(qdserve, os.X_OK)):
        sys.exit(f"not an executable: {qdserve} (pass --qdserve PATH)")
    port = port or free_port()
    inputs = _inputs()
    reqs = requests_list()
    names = [r.name for r in reqs]
    assert len(names) == len(set(names)), "request names must be unique"
    logdir = Path(tempfile.mkdtemp(prefix="qds-replay-"))
    log_path = logdir / "server.log"
    t0 = time.monotonic()
    print(f"starting {qdserve} serve --port {port} (log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [qdserve, "serve", "--host", HOST, "--port", str(port)],
            env=server_env(env_extra),
            cwd=logdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for the SIGKILL fallback only
        )
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    rc: int | None = None
    try:
        base = f"http://{HOST}:{port}"
        with httpx.Client(base_url=base, timeout=httpx.Timeout(600.0)) as client:
            deadline = time.monotonic() + ready_s
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-4000:]
                    sys.exit(f"server exited ({proc.returncode}) before ready:\n{tail}")
                if time.monotonic() > deadline:
                    sys.exit(f"server not ready after {ready_s:.0f} s (log: {log_path})")
                try:
                    if client.get("/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            timings["startup_s"] = round(time.monotonic() - t0, 1)
            print(f"ready after {timings['startup_s']} s; {len(reqs)} requests", flush=True)
            t1 = time.monotonic()
            for req in reqs:
                t = time.monotonic()
                try:
                    rec = send(client, req, inputs)
                except httpx.HTTPError as exc:  # a crash or hang is a finding, not the end
                    rec = {"name": req.name, "method": req.method, "path": req.path}
                    rec["status"] = f"no response: {type(exc).__name__}"
                results.append(rec)
                print(f"  {req.name}: {rec['status']} ({time.monotonic() - t:.2f} s)", flush=True)
            timings["requests_s"] = round(time.monotonic() - t1, 1)
    finally:
        t2 = time.monotonic()
        rc = _stop(proc)
        timings["shutdown_s"] = round(time.monotonic() - t2, 1)
    timings["total_s"] = round(time.monotonic() - t0, 1)
    doc = {
        "format": FORMAT_VERSION,
        # Not compared: where and when, and how long it took.
        "meta": {
            "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "qdserve": qdserve,
            "git_head": _git_head(qdserve),
            "python": sys.version.split()[0],
            "seconds": timings,
        },
        "server_env": env_extra,
        "inputs": {name: _sha(data) for name, (_, data, _) in sorted(inputs.items())},
        "results": results,
        "shutdown": {"returncode": rc},
    }
    shutil.rmtree(logdir, ignore_errors=True)  # kept when the run failed (sys.exit above)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out} in {timings['total_s']} s (server exit code {rc})", flush=True)
    return doc


# -- comparing --------------------------------------------------------------------------------
def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two normalized values (path: where)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "sha256_rgb" in a and "sha256_rgb" in b:
            return _image_diff(a, b, path)
        out = []
        for key in sorted(a.keys() | b.keys(), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append(f"{where}: only in BEFORE ({_short(a[key])})")
            elif key not in a:
                out.append(f"{where}: only in AFTER ({_short(b[key])})")
            else:
                out.extend(diff(a[key], b[key], where))
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items BEFORE, {len(b)} AFTER")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            out.extend(diff(x, y, f"{path}[{i}]"))
        return out
    if a != b or type(a) is not type(b):
        return [f"{path}: {_short(a)} != {_short(b)}"]
    return []


def _image_diff(a: dict[str, Any], b: dict[str, Any], path: str) -> list[str]:
    out = []
    if a.get("sha256_rgb") != b.get("sha256_rgb"):
        out.append(
            f"{path}: PIXELS DIFFER (sha256_rgb {a.get('sha256_rgb', '')[:12]} != "
            f"{b.get('sha256_rgb', '')[:12]}; mean RGB {a.get('mean_rgb')} -> {b.get('mean_rgb')})"
        )
    elif a.get("sha256_bytes") != b.get("sha256_bytes"):
        out.append(f"{path}: same pixels, different encoded bytes (sha256_bytes)")
    for key in sorted((a.keys() | b.keys()) - {"sha256_rgb", "sha256_bytes", "mean_rgb"}):
        if a.get(key) != b.get(key):
            out.append(f"{path}.{key}: {_short(a.get(key))} != {_short(b.get(key))}")
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every difference, as lines "request: field: what"."""
    problems = []
    for key in ("format", "server_env", "inputs", "shutdown"):
        for line in diff(before.get(key), after.get(key), key):
            problems.append(f"[{key}] {line}")
    a = {r["name"]: r for r in before.get("results", [])}
    b = {r["name"]: r for r in after.get("results", [])}
    for name in a.keys() - b.keys():
        problems.append(f"[{name}] only in BEFORE")
    for name in b.keys() - a.keys():
        problems.append(f"[{name}] only in AFTER")
    order_a = [n for n in a if n in b]
    order_b = [n for n in b if n in a]
    if order_a != order_b:
        problems.append("[order] requests ran in a different order")
    for name in order_a:
        types_a = [e.get("event") for e in a[name].get("events", [])]
        types_b = [e.get("event") for e in b[name].get("events", [])]
        if types_a != types_b:
            problems.append(f"[{name}] event types: {types_a} != {types_b}")
        for line in diff(a[name], b[name]):
            problems.append(f"[{name}] {line}")
    return problems


def cmd_compare(before_path: Path, after_path: Path) -> int:
    before = json.loads(before_path.read_text())
    after = json.loads(after_path.read_text())
    problems = compare(before, after)
    n = len(before.get("results", []))
    secs = [d.get("meta", {}).get("seconds", {}).get("total_s") for d in (before, after)]
    print(f"BEFORE {before_path} ({n} requests, {secs[0]} s) vs AFTER {after_path} ({secs[1]} s)")
    if not problems:
        print("no differences")
        return 0
    for line in problems:
        print(line)
    requests = {p.split("]", 1)[0][1:] for p in problems}
    print(f"{len(problems)} differences in {len(requests)} of {n} requests/sections")
    return 1


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = dict(SERVER_ENV)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def server_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--qdserve", help="qdserve executable (default: beside this python)")
        sp.add_argument("--port", type=int, help="port (default: a free one)")
        sp.add_argument(
            "--ready-timeout", type=float, default=1800.0, help="seconds to wait for /readyz"
        )

    r = sub.add_parser("record", help="record the requests against a fresh server")
    r.add_argument("out", type=Path)
    server_args(r)
    r.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra / overriding server environment (recorded; replay reuses it)",
    )
    c = sub.add_parser("compare", help="compare two recordings; exit 1 on any difference")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    rp = sub.add_parser("replay", help="record (with BEFORE's environment) and compare")
    rp.add_argument("before", type=Path)
    server_args(rp)
    rp.add_argument("--keep", type=Path, help="keep the new recording here")
    args = p.parse_args(argv)

    if args.cmd == "compare":
        return cmd_compare(args.before, args.after)
    qdserve = args.qdserve or default_qdserve()
    if args.cmd == "record":
        record(args.out, qdserve, args.port, _env_pairs(args.env), args.ready_timeout)
        return 0
    before = json.loads(args.before.read_text())
    if args.keep:
        out = args.keep
    else:
        fd, name = tempfile.mkstemp(prefix="qds-replay-", suffix=".json")
        os.close(fd)
        out = Path(name)
    record(out, qdserve, args.port, before.get("server_env", SERVER_ENV), args.ready_timeout)
    return cmd_compare(args.before, out)


if __name__ == "__main__":
    sys.exit(main())
