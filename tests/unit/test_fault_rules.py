"""The fault-handling rules that need no server (issue 27): client-facing error texts without
internals, retryable 503s, fair admission order across API keys, per-key queue bounds,
uploads brought to the output size before they cross to the engine, on-demand loads that
never evict the default model and a failed load remembered for a back-off."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from engine.cache import ModelCache
from engine.client import EngineClient
from engine.failures import EngineUnavailable, QueueFull, load_failed, out_of_memory
from engine.keys import ModelKey
from engine.scheduler import fair_order
from service.errors import to_api_error
from service.metrics import Metrics
from service.uploads import EditForm, bound, decode_edit_images
from service.variants import lora_cards

TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity; "
    "75.02 GiB already allocated; 1.06 GiB free; 77.20 GiB reserved in total by PyTorch)"
)
LOAD_ERROR = (
    "[Errno 2] No such file or directory: '/srv/models/flux/transformer/"
    "diffusion_pytorch_model.safetensors' (https://huggingface.co/black-forest-labs/FLUX.1-dev)"
)


def test_oom_text_for_clients_says_what_to_do_without_the_allocator_dump(
    caplog: pytest.LogCaptureFixture,
) -> None:
    err = to_api_error(out_of_memory(TORCH_OOM))
    assert err.status == 503 and err.code == "out_of_memory"
    assert "GiB" not in err.message and "GPU 0" not in err.message
    assert "retry with fewer images" in err.message
    with caplog.at_level(logging.ERROR, "qdserve.errors"):
        to_api_error(out_of_memory(TORCH_OOM))
    assert TORCH_OOM in caplog.text  # the operator still gets it, in the log


def test_load_failure_text_has_no_paths_or_hosts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "qdserve.errors"):
        err = to_api_error(load_failed("embedded:none", LOAD_ERROR))
    assert err.status == 503 and err.code == "model_load_failed"
    for leak in ("/srv", "huggingface.co", "Errno", "safetensors"):
        assert leak not in err.message
    assert "embedded:none" in err.message and "server log" in err.message
    assert LOAD_ERROR in caplog.text


def test_failures_keep_their_detail_across_the_pipe() -> None:
    import pickle

    failure = pickle.loads(pickle.dumps(out_of_memory(TORCH_OOM)))
    assert failure.detail == TORCH_OOM
    gone = pickle.loads(pickle.dumps(EngineUnavailable("hung", retry_after=10)))
    assert gone.retry_after == 10


def test_engine_unavailable_is_retryable() -> None:
    err = to_api_error(EngineUnavailable("the engine was killed; restarting", retry_after=10))
    assert err.status == 503 and err.headers == {"Retry-After": "10"}
    assert to_api_error(EngineUnavailable("x")).headers == {}


def test_lora_cards_do_not_show_sources() -> None:
    from pipelines.lora import LoraSpec

    spec = LoraSpec("style", "/srv/secret/adapters/style.safetensors")
    entry = SimpleNamespace(
        loras=({"name": "style", "source": spec.source, "rank": 4},), lora_error=""
    )
    for card in lora_cards([spec], entry) + lora_cards([spec], None):
        assert "source" not in card and "/srv" not in str(card)
    assert lora_cards([spec], entry)[0]["rank"] == 4


# -- fair admission ---------------------------------------------------------------------------
def _job(job_id: str, owner: str) -> Any:
    return SimpleNamespace(job_id=job_id, owner=owner)


def test_queue_is_served_in_turn_across_keys() -> None:
    queue = [_job(f"h{i}", "key1") for i in range(5)] + [_job("l0", "key2")]
    queue.insert(3, _job("m0", "key3"))
    order = [j.job_id for j in fair_order(queue)]
    # The light keys' first jobs come in the first round, not behind the heavy key's five.
    assert order[:3] == ["h0", "m0", "l0"]
    assert [j for j in order if j.startswith("h")] == [f"h{i}" for i in range(5)]  # FIFO
    single = [_job(str(i), "") for i in range(4)]
    assert fair_order(single) == single  # no keys: plain FIFO
    # The owner served last waits for the others: the heavy key just had its turn.
    order = [j.job_id for j in fair_order(queue, {"key1": 7, "key2": 3})]
    assert order[:3] == ["m0", "l0", "h0"]


def _client(max_queue: int, per_owner: int | None) -> EngineClient:
    config = SimpleNamespace(settings=SimpleNamespace(max_batch=1, engine_stall_timeout=0))
    return EngineClient(
        config,  # type: ignore[arg-type]
        mode="inline",
        metrics=Metrics(),
        max_queue=max_queue,
        max_queue_per_owner=per_owner,
    )


def _queue(client: EngineClient, owner: str, n: int) -> None:
    from engine.client import PendingJob

    loop = asyncio.new_event_loop()
    for _ in range(n):
        job_id = str(len(client._jobs))
        client._jobs[job_id] = PendingJob(job_id, None, 1, loop.create_future(), owner=owner)  # type: ignore[arg-type]
    loop.close()


def test_a_key_over_its_share_gets_429_while_others_have_room() -> None:
    client = _client(max_queue=8, per_owner=6)
    _queue(client, "key1", 6)
    with pytest.raises(QueueFull) as info:
        client.check_room("key1")
    assert "QDS_MAX_QUEUE_PER_KEY=6" in info.value.message and info.value.retry_after >= 1
    client.check_room("key2")  # the light key still gets in
    _queue(client, "key2", 2)
    with pytest.raises(QueueFull, match="the queue is full"):
        client.check_room("key3")
    # Without keys one client may use the whole queue.
    anonymous = _client(max_queue=8, per_owner=None)
    _queue(anonymous, "", 7)
    anonymous.check_room("")


# -- uploads ----------------------------------------------------------------------------------
def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 255)[: len(mode)]).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_bound_is_the_output_size_or_the_pixel_cap() -> None:
    assert bound((4096, 4096), (32, 32), 1024 * 1024) == (32, 32)
    assert bound((4096, 2048), None, 1024 * 1024) == (1448, 724)
    assert bound((64, 64), (512, 512), 1024 * 1024) == (64, 64)  # never upscaled here
    assert bound((640, 480), None, 1024 * 1024) == (640, 480)


def test_large_upload_crosses_to_the_engine_at_the_output_size() -> None:
    mask = Image.new("RGBA", (2048, 1024), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 512, 1024))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    form = EditForm({}, [_png((2048, 1024))], buf.getvalue())
    out = decode_edit_images(form, 4096 * 4096, output_size=(64, 32), fit_pixels=1024 * 1024)
    assert out.image.size == (64, 32) and out.mask is not None and out.mask.size == (64, 32)
    assert out.input_size == (2048, 1024)
    assert set(out.mask.getdata()) == {0, 255}  # still a hard mask
    assert out.mask.getpixel((4, 16)) == 255 and out.mask.getpixel((40, 16)) == 0
    auto = decode_edit_images(
        EditForm({}, [_png((4096, 4096))], None), 4096 * 4096, fit_pixels=256 * 256
    )
    assert auto.image.size == (256, 256) and auto.input_size == (4096, 4096)


# -- the model cache ----------------------------------------------------------------------------
def _key(name: str) -> ModelKey:
    return ModelKey(name, "none", None, "float32")  # type: ignore[call-arg]


class _Loaded:
    storage_bytes = 1
    load_seconds = 0.0

    def release(self) -> None:
        pass


def _wait(fut: concurrent.futures.Future) -> BaseException | None:
    try:
        fut.result(10)
    except Exception as exc:
        return exc
    return None


def test_on_demand_loads_never_evict_the_default_and_failures_back_off() -> None:
    default, other, broken = _key("default"), _key("other"), _key("broken")
    calls: list[str] = []

    def loader(settings: Any) -> _Loaded:
        calls.append(settings)
        if settings == "broken":
            raise RuntimeError("weights file truncated")
        return _Loaded()

    cache = ModelCache(
        loader,  # type: ignore[arg-type]
        max_entries=1,
        memory_budget=None,
        protected=frozenset({default}),
        failure_backoff=60,
    )
    assert _wait(cache.load(default, "default")) is None  # type: ignore[arg-type]
    # A failing on-demand load leaves the default loaded...
    assert isinstance(_wait(cache.load(broken, "broken")), RuntimeError)  # type: ignore[arg-type]
    assert cache.is_loaded(default)
    # ...and is answered from memory during the back-off, without another attempt.
    assert isinstance(_wait(cache.load(broken, "broken")), RuntimeError)  # type: ignore[arg-type]
    assert calls.count("broken") == 1
    # A successful on-demand load does not evict the default either (over the cap instead).
    assert _wait(cache.load(other, "other")) is None  # type: ignore[arg-type]
    assert cache.is_loaded(default)
    # After the back-off a request tries again.
    cache._failed[broken] = (time.monotonic() - 61, cache._failed[broken][1])
    assert isinstance(_wait(cache.load(broken, "broken")), RuntimeError)  # type: ignore[arg-type]
    assert calls.count("broken") == 2
    cache.close()
