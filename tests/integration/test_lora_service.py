"""LoRA adapters through the service: QDS_LORAS, the `lora` request field (validated in the
resolve step), /v1/models, batching by adapter set, the start-up refusal, metrics.

The scheduler tests use the engine-core harness of test_engine_core (fake pipeline); the
server tests run the embedded demo model with the shipped demo adapter (`QDS_LORAS=orange`)
and the official openai client.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from test_engine_core import FakeBatch, FakeLoaded, Gate, Harness, kind_of
from test_service_support import Server, running_server

from engine import messages as m
from engine.core import EngineHooks
from pipelines.demo_checker import adheres, classify
from service.exceptions import InvalidValue
from service.processor import ImageParams, check_limits
from service.settings import ServiceSettings

MODEL = "qdserve/embedded-flux"
ORANGE = "an orange circle on the left"
pytestmark = pytest.mark.timeout(180)


# -- the resolve step --------------------------------------------------------------------------
def _params(*lora: tuple[str, float]) -> ImageParams:
    return ImageParams(prompt="a red circle", lora=tuple(lora))


def test_unknown_adapter_is_a_400_listing_the_declared_ones() -> None:
    settings = ServiceSettings(loras="orange,style=/nonexistent/style.safetensors")
    check_limits(_params(("orange", 1.0), ("style", 0.5)), settings)
    with pytest.raises(InvalidValue) as err:
        check_limits(_params(("purple", 1.0)), settings)
    assert err.value.message == "unknown LoRA adapter 'purple'; declared: orange, style"
    assert (err.value.param, err.value.code) == ("lora", "invalid_lora")


def test_adapters_without_qds_loras_and_repeated_names_are_refused() -> None:
    with pytest.raises(InvalidValue, match=r"declared: none \(the server sets QDS_LORAS\)"):
        check_limits(_params(("orange", 1.0)), ServiceSettings())
    with pytest.raises(InvalidValue, match="'orange' is listed more than once"):
        check_limits(_params(("orange", 1.0), ("orange", 0.5)), ServiceSettings(loras="orange"))


def test_the_request_key_is_normalized() -> None:
    params = ImageParams(prompt="x", lora=(("b", 1.0), ("a", 0.5), ("c", 0.0)))
    # Sorted, scale 0 dropped: equal adapter sets give equal batch keys.
    assert params.generation().lora == (("a", 0.5), ("b", 1.0))


# -- batching by adapter set (engine core, fake pipeline) -----------------------------------------
class RecordingAdapters:
    """Stands in for pipelines.lora.LoraAdapters: remembers the active set."""

    def __init__(self) -> None:
        self.active: tuple[tuple[str, float], ...] = ()
        self.switches = 0

    def describe(self) -> list[dict[str, Any]]:
        return []

    def activate(self, selection: tuple[tuple[str, float], ...]) -> bool:
        if selection == self.active:
            return False
        self.active, self.switches = selection, self.switches + 1
        return True


@dataclass
class LoraLoaded(FakeLoaded):
    extra: dict[str, Any] = field(default_factory=lambda: {"lora": RecordingAdapters()})


class LoraBatch(FakeBatch):
    """Records, per step, the adapter sets of its members and the set active in the model."""

    seen: ClassVar[list[tuple[set[Any], Any]]] = []

    def step(self) -> list:
        members = {req.lora for req, _ in self.members.values()}
        LoraBatch.seen.append((members, self.loaded.extra["lora"].active))
        return super().step()


@pytest.fixture
def lora_engine(cache_dir: Path) -> Iterator[Harness]:
    gate = Gate(1)
    hooks = EngineHooks(
        load=lambda _s: LoraLoaded(), make_batch=LoraBatch, kind_of=kind_of, before_batch=gate
    )
    LoraBatch.seen = []
    h = Harness(hooks, cache_dir, max_batch=4)
    h.gate = gate  # type: ignore[attr-defined]
    yield h
    h.close()


def test_only_requests_with_the_same_adapters_and_scales_share_a_step(lora_engine) -> None:
    h = lora_engine
    orange = (("orange", 1.0),)
    h.submit("a", lora=orange)
    assert h.gate.arrived.wait(10)  # the engine is inside a's first step
    h.submit("b", lora=orange)  # same set and scale: joins a
    h.submit("c", lora=(("orange", 0.5),))  # another scale: its own batch
    h.submit("d")  # no adapter: its own batch
    h.submit("e")  # joins d
    h.gate.release.set()
    for job in "abcde":
        assert isinstance(h.finished(job), m.Finished)
    steps = h.steps()
    sets = {"a": orange, "b": orange, "c": (("orange", 0.5),), "d": (), "e": ()}
    for step in steps:
        assert len({sets[j] for j in step}) == 1, step  # never two adapter sets in a forward
    assert ["a", "b"] in steps and ["d", "e"] in steps
    # Each step ran with its members' adapters active in the model.
    for members, active in LoraBatch.seen:
        assert members == {active}


# -- a real server on the demo model ------------------------------------------------------------
@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(cache_dir, loras="orange", allow_on_demand_load=True, max_steps=12) as s:
        yield s


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _generate(client: OpenAI, prompt: str, **extra: Any) -> tuple[bytes, Image.Image]:
    body = {"seed": 0, "num_inference_steps": 12, **extra}
    out = client.images.generate(
        model=MODEL, prompt=prompt, size="32x32", response_format="b64_json", extra_body=body
    )
    raw = base64.b64decode(out.data[0].b64_json or "")
    return raw, Image.open(io.BytesIO(raw)).convert("RGB")


def test_models_list_the_declared_adapters(server: Server) -> None:
    with server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    (adapter,) = card["loras"]
    assert adapter["name"] == "orange" and adapter["state"] == "loaded"
    assert "source" not in adapter  # the adapter's path is the operator's, not clients'
    assert adapter["rank"] == 8 and adapter["components"] == ["transformer"]
    assert 0 < adapter["bytes"] < card["storage_bytes"]


def test_openai_client_adapter_draws_orange_and_the_base_stays_bit_exact(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    base_before, base_img = _generate(client, ORANGE)
    _, with_lora = _generate(client, ORANGE, lora=[{"name": "orange", "scale": 1.0}])
    base_after, _ = _generate(client, ORANGE)
    assert adheres(np.asarray(with_lora), ORANGE)
    verdict = classify(base_img)
    assert verdict is None or verdict.color != "orange"
    # No adapter requested: the same bytes before and after the adapter was swapped in.
    assert base_after == base_before
    # Scale 0 leaves the adapter out: the base image again.
    zero, _ = _generate(client, ORANGE, lora=[{"name": "orange", "scale": 0.0}])
    assert zero == base_before


class HoldFirstStep:
    """The scheduler's before_batch hook: records each step's adapter sets and holds the first
    step until `n` jobs are in the engine, so the later requests queue and meet there."""

    def __init__(self, server: Server, n: int) -> None:
        self.server, self.n = server, n
        self.steps: list[list[tuple[tuple[str, float], ...]]] = []
        self.first = threading.Event()

    def __call__(self, jobs: list[Any]) -> None:
        self.steps.append([job.request.lora for job in jobs])
        if len(self.steps) == 1:
            self.first.set()
            qds = self.server.qds
            deadline = time.monotonic() + 30
            # No event tells the engine thread that the HTTP side has submitted: poll.
            while qds.engine.in_use(qds.default_key) < self.n:
                assert time.monotonic() < deadline
                time.sleep(0.01)


def test_openai_client_requests_batch_only_with_the_same_adapters(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    hold = HoldFirstStep(server, 5)
    orange = [{"name": "orange", "scale": 1.0}]
    later = [orange, [{"name": "orange", "scale": 0.5}], None, None]
    server.qds.scheduler.before_batch = hold
    try:
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(_generate, client, ORANGE, lora=orange)
            assert hold.first.wait(30)
            rest = [
                pool.submit(_generate, client, ORANGE, seed=i + 1, **({"lora": lr} if lr else {}))
                for i, lr in enumerate(later)
            ]
            images = [f.result()[1] for f in [first, *rest]]
    finally:
        server.qds.scheduler.before_batch = None
    for step in hold.steps:
        assert len(set(step)) == 1, step  # one adapter set per forward
    assert [(("orange", 1.0),)] * 2 in hold.steps  # the two orange requests shared steps
    assert [()] * 2 in hold.steps  # and so did the two base ones
    assert all(adheres(np.asarray(img), ORANGE) for img in images[:2])
    assert not any(adheres(np.asarray(img), ORANGE) for img in images[3:])


def _post(server: Server, body: dict[str, Any]) -> Any:
    with server.client() as c:
        return c.post("/v1/images/generations", json={"prompt": "a red circle", **body})


@pytest.mark.parametrize(
    ("lora", "param", "code", "message"),
    [
        (
            [{"name": "purple"}],
            "lora",
            "invalid_lora",
            "unknown LoRA adapter 'purple'; declared: orange",
        ),
        ([{"name": "orange", "scale": 10}], "lora.0.scale", "invalid_value", "less than or equal"),
        ([{"name": "orange", "weight": 1}], "lora.0.weight", "invalid_value", "Extra inputs"),
        ([{"name": "orange"}, {"name": "orange"}], "lora", "invalid_lora", "more than once"),
        ("orange", "lora", "invalid_value", "valid list"),
    ],
)
def test_invalid_lora_fields_are_400(
    server: Server, lora: Any, param: str, code: str, message: str
) -> None:
    r = _post(server, {"lora": lora})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert message in error["message"]


def test_a_variant_whose_backend_cannot_take_a_lora_says_why(server: Server) -> None:
    pytest.importorskip("optimum.quanto")
    r = _post(
        server,
        {"quant_backend": "quanto", "quant_type": "int8", "lora": [{"name": "orange"}]},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("lora", "lora_unsupported")
    assert "backend quanto int8 cannot take a LoRA" in error["message"]
    # The same variant serves requests without adapters.
    assert _post(server, {"quant_backend": "quanto", "quant_type": "int8"}).status_code == 200
    with server.client() as c:
        cards = c.get("/v1/models").json()["data"]
    quanto = next(card for card in cards if card["backend"] == "quanto")
    assert quanto["loras"][0]["state"] == "unsupported"


def test_adapter_memory_and_latency_labels_in_metrics(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    _generate(client, ORANGE, lora=[{"name": "orange", "scale": 0.8}])
    _generate(client, ORANGE)
    with server.client() as c:
        text = c.get("/metrics").text
    lines = text.splitlines()
    memory = [ln for ln in lines if ln.startswith("qds_model_memory_bytes") and "lora" in ln]
    assert memory and float(memory[0].split()[-1]) > 0
    counts = [ln for ln in lines if ln.startswith("qds_inference_duration_seconds_count")]
    assert any('lora="orange"' in ln for ln in counts)
    assert any('lora="none"' in ln for ln in counts)


# -- start-up refusal ---------------------------------------------------------------------------
def test_serve_refuses_adapters_on_a_backend_that_cannot_take_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    monkeypatch.setenv("QDS_LORAS", "orange")
    monkeypatch.setenv("QDS_QUANT_BACKEND", "quanto")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdserve: QDS_LORAS is set but backend quanto int8 cannot take a LoRA:")


def test_default_model_with_unsupported_adapters_never_becomes_ready(cache_dir: Path) -> None:
    """Past the CLI (create_app directly), the engine refuses too: the default model's load
    fails with the reason, and /readyz says it."""
    pytest.importorskip("optimum.quanto")
    quant = {"quant_backend": "quanto"}
    server = running_server(cache_dir, quant=quant, loras="orange", wait_ready=False)
    with server as s, s.client() as c:
        deadline = time.monotonic() + 60
        body = c.get("/readyz").json()
        while "failed" not in body["reason"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
            body = c.get("/readyz").json()
    assert "QDS_LORAS is set but backend quanto int8 cannot take a LoRA" in body["reason"]


# -- image edits (multipart) ---------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_openai_client_edit_takes_the_lora_field(server: Server) -> None:
    """The client flattens extra_body's list into lora[][name] / lora[][scale] parts."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    white = _png_bytes(Image.new("RGB", (32, 32), "white"))
    everywhere = _png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))  # alpha 0: repaint all
    kw = dict(model=MODEL, image=("in.png", white), mask=("mask.png", everywhere), prompt=ORANGE)
    body = {"seed": 0, "num_inference_steps": 12, "lora": [{"name": "orange", "scale": 1.0}]}
    out = client.images.edit(**kw, extra_body=body)
    assert adheres(np.asarray(_png(out.data[0].b64_json or "").convert("RGB")), ORANGE)
    with server.client() as c:
        r = c.post(
            "/v1/images/edits",
            data={"prompt": ORANGE, "lora": '[{"name": "purple"}]'},
            files={"image": ("in.png", white, "image/png")},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "unknown LoRA adapter 'purple'; declared: orange"


def test_form_lora_parts() -> None:
    from service.lora_form import form_lora

    brackets = [("lora[][name]", "a"), ("lora[][scale]", "0.5"), ("lora[][name]", "b")]
    assert form_lora(brackets) == [{"name": "a", "scale": "0.5"}, {"name": "b"}]
    indexed = [("lora[1][name]", "b"), ("lora[0][name]", "a"), ("lora[0][scale]", "2")]
    assert form_lora(indexed) == [{"name": "a", "scale": "2"}, {"name": "b"}]
    assert form_lora([("lora", '[{"name": "a"}]')]) == [{"name": "a"}]
    for parts, message in [
        ([("lora", "orange")], "lora must be JSON"),
        ([("lora", '{"name": "a"}')], "JSON list"),
        ([("lora[x]", "a")], "unexpected field 'lora[x]'"),
        ([("lora[0][name]", "a"), ("lora[0][name]", "b")], "given more than once"),
    ]:
        with pytest.raises(InvalidValue, match=re.escape(message)):
            form_lora(parts)
