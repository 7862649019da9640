"""Step-level batching (pipelines/stepping.py) and the prompt-embedding cache.

Same-seed-same-image guarantee, compared as 8-bit RGB pixels against `generate()` (the
pipeline's own call) with the same resolved request, on the random-weight embedded model
(32x32, 4 steps), torch 2.13 CPU. Measured max abs pixel difference (out of 255):

- a request run alone through StepBatch: 0 (bit-identical) unquantized, quanto int8,
  torchao int8wo and GGUF Q8_0 (the last measured by a script, not tested here); also 0 on
  the trained demo model (12 steps);
- a request that joins a running batch at step k (k = 0..3, 3 seeds, beside a 2-image request
  on a 6-step schedule): 0 unquantized, torchao int8wo and GGUF Q8_0 (k = 1, one seed), 1
  with quanto int8 (its int8 matmul rounds differently at another batch size).

The stated tolerance is therefore TOL = 2 / 255; unquantized CPU runs are asserted exact.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.generate import GenerationRequest, GenerationResult, generate, resolve
from pipelines.loader import LoadedPipeline, load_pipeline
from pipelines.prompt_cache import PromptCache, tensor_bytes
from pipelines.stepping import StepBatch, step_key, supports_stepping, variant_id
from quantization.settings import QuantSettings

TOL = 2  # max abs difference of uint8 pixels, see the module docstring


@pytest.fixture(scope="module")
def loaded(embedded_path: Path) -> LoadedPipeline:
    return load_pipeline(QuantSettings(model=str(embedded_path)))


def _req(loaded: LoadedPipeline, **kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a red circle on the left", "seed": 7}
    return resolve(loaded.defaults, GenerationRequest(**{**base, **kw}))


def _px(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(im).astype(np.int16) for im in result.images])


def _diff(a: GenerationResult, b: GenerationResult) -> int:
    return int(np.abs(_px(a) - _px(b)).max())


_REFS: dict[tuple[str, GenerationRequest], GenerationResult] = {}


def _generate(loaded: LoadedPipeline, req: GenerationRequest) -> GenerationResult:
    """generate() (the pipeline's own call), memoized: several tests compare to the same one."""
    key = (variant_id(loaded), req)
    if key not in _REFS:
        _REFS[key] = generate(loaded, req)
    return _REFS[key]


def _drain(batch: StepBatch) -> dict[str, tuple[GenerationResult, int]]:
    """Step until empty: job id -> (result, number of step() calls when it came out)."""
    out: dict[str, tuple[GenerationResult, int]] = {}
    calls = 0
    while len(batch):
        calls += 1
        for job_id, result in batch.step():
            out[job_id] = (result, calls)
    return out


def _alone(loaded: LoadedPipeline, req: GenerationRequest, **kw: Any) -> GenerationResult:
    batch = StepBatch(loaded, **kw)
    batch.add("a", req)
    return _drain(batch)["a"][0]


# -- resolve -------------------------------------------------------------------------------


def test_resolve_fills_every_default_and_draws_a_seed(loaded: LoadedPipeline) -> None:
    d = loaded.defaults
    r = resolve(d, GenerationRequest(prompt="x"))
    assert (r.width, r.height, r.num_inference_steps, r.guidance_scale) == (
        d.size,
        d.size,
        d.steps,
        d.guidance,
    )
    assert isinstance(r.seed, int)
    assert resolve(d, GenerationRequest(prompt="x"), default_steps=9).num_inference_steps == 9
    given = GenerationRequest(
        prompt="x", width=48, height=64, num_inference_steps=3, guidance_scale=0.0, seed=5
    )
    assert resolve(d, given, default_steps=9) == given


# -- capability and keys ---------------------------------------------------------------------


def test_supports_stepping_only_for_flux(loaded: LoadedPipeline) -> None:
    assert supports_stepping(loaded)
    other = replace(loaded, pipeline=object())
    assert not supports_stepping(other)
    with pytest.raises(ValueError, match=r"cannot run the step-level loop.*use generate_batch"):
        StepBatch(other)


def test_step_key_ignores_steps_and_seed_only(loaded: LoadedPipeline) -> None:
    a = _req(loaded)
    assert step_key(loaded, a) == step_key(loaded, replace(a, num_inference_steps=9, seed=1))
    assert step_key(loaded, a) == step_key(loaded, replace(a, prompt="other"))
    for changed in (
        replace(a, width=64),
        replace(a, guidance_scale=1.0),
        replace(a, negative_prompt="blue"),
    ):
        assert step_key(loaded, a) != step_key(loaded, changed)


def test_can_join_and_add_refusals(loaded: LoadedPipeline) -> None:
    batch = StepBatch(loaded, max_images=3)
    assert batch.step() == []
    big = _req(loaded, num_images=4)
    assert batch.can_join(big)  # an empty batch takes any request, even over max_images
    with pytest.raises(ValueError, match="is not final"):
        batch.add("u", GenerationRequest(prompt="x"))
    batch.add("a", _req(loaded, num_images=2))
    assert len(batch) == 2
    assert batch.can_join(_req(loaded, seed=1, num_inference_steps=2))
    assert not batch.can_join(_req(loaded, num_images=2))  # 4 > 3 images
    assert not batch.can_join(_req(loaded, width=64, height=64))
    with pytest.raises(ValueError, match="already in the batch"):
        batch.add("a", _req(loaded))
    with pytest.raises(ValueError, match="cannot join"):
        batch.add("b", _req(loaded, negative_prompt="blue"))
    assert batch.remove("a") and not batch.remove("a")
    assert batch.key is None and len(batch) == 0
    assert batch.can_join(_req(loaded, width=64, height=64))


# -- same seed, same image -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_images": 2, "seed": 11}, {"negative_prompt": "a blue square", "seed": 3}],
    ids=["one", "two-images", "true-cfg"],
)
def test_alone_equals_generate(loaded: LoadedPipeline, kw: dict[str, Any]) -> None:
    req = _req(loaded, **kw)
    ref = _generate(loaded, req)
    got = _alone(loaded, req)
    assert got.seeds == ref.seeds
    assert (got.width, got.height, got.steps) == (ref.width, ref.height, ref.steps)
    assert len(got.images) == req.num_images
    assert _diff(got, ref) == 0  # measured: bit-identical


@pytest.mark.parametrize("k", [1, 3])
def test_join_at_step_k_gives_the_alone_image(loaded: LoadedPipeline, k: int) -> None:
    running = _req(loaded, prompt="a green star", seed=21, num_images=2, num_inference_steps=6)
    joiner = _req(loaded, seed=8)
    batch = StepBatch(loaded)
    batch.add("running", running)
    for _ in range(k):
        assert batch.step() == []
    assert batch.progress("running") == (k, 6)
    batch.add("joiner", joiner)
    assert batch.progress("joiner") == (0, 4)
    out = _drain(batch)
    assert out["joiner"][1] == 4  # left after its own 4 steps, not the batch's
    assert out["running"][1] == 6 - k
    assert _diff(out["joiner"][0], _generate(loaded, joiner)) <= TOL
    assert _diff(out["running"][0], _generate(loaded, running)) <= TOL
    # 3 images while both run (min(4, 6 - k) steps), then the joiner alone.
    together = min(4, 6 - k)
    assert out["joiner"][0].timings["batch_images"] == (3 * together + (4 - together)) / 4


def test_different_step_counts_finish_after_their_own_steps(loaded: LoadedPipeline) -> None:
    reqs = {
        "two": _req(loaded, seed=1, num_inference_steps=2),
        "five": _req(loaded, seed=2, num_inference_steps=5),
        "three": _req(loaded, seed=3, num_inference_steps=3),
    }
    batch = StepBatch(loaded)
    for job_id, req in reqs.items():
        batch.add(job_id, req)
    assert len(batch) == 3
    out = _drain(batch)
    assert {j: calls for j, (_, calls) in out.items()} == {"two": 2, "three": 3, "five": 5}
    for job_id, req in reqs.items():
        result = out[job_id][0]
        assert result.steps == req.num_inference_steps
        assert _diff(result, _generate(loaded, req)) <= TOL


def test_requests_finishing_together_share_one_decode(
    loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = {"a": _req(loaded, seed=11), "b": _req(loaded, seed=12, num_images=2)}
    batch = StepBatch(loaded)
    batch.add_many(list(reqs.items()))
    decoded: list[int] = []
    real = batch._decode
    monkeypatch.setattr(
        batch, "_decode", lambda packed, req: decoded.append(len(packed)) or real(packed, req)
    )
    out = _drain(batch)
    assert decoded == [3]  # one VAE call for all 3 images, not one per request
    assert len(out["a"][0].images) == 1 and len(out["b"][0].images) == 2
    for job_id, req in reqs.items():
        assert out[job_id][0].seeds == [req.seed] + ([req.seed + 1] if req.num_images > 1 else [])
        assert _diff(out[job_id][0], _generate(loaded, req)) <= TOL


def test_remove_drops_a_request_and_the_others_finish(loaded: LoadedPipeline) -> None:
    keep = {"a": _req(loaded, seed=31), "c": _req(loaded, seed=33, num_inference_steps=3)}
    batch = StepBatch(loaded)
    batch.add("a", keep["a"])
    batch.add("b", _req(loaded, seed=32, num_images=2))
    batch.add("c", keep["c"])
    batch.step()
    assert batch.remove("b")
    assert batch.job_ids() == ["a", "c"] and len(batch) == 2
    with pytest.raises(KeyError):
        batch.progress("b")
    out = _drain(batch)
    assert set(out) == {"a", "c"}
    for job_id, req in keep.items():
        assert _diff(out[job_id][0], _generate(loaded, req)) <= TOL


def test_add_many_encodes_once_and_is_all_or_none(loaded: LoadedPipeline) -> None:
    reqs = {
        "a": _req(loaded, seed=61),
        "b": _req(loaded, prompt="a green star", seed=62, num_inference_steps=3),
        "c": _req(loaded, prompt="a blue square", seed=63, num_images=2),
    }
    batch = StepBatch(loaded, max_images=4)
    with pytest.raises(ValueError, match="'x' cannot join"):
        batch.add_many([("w", reqs["a"]), ("x", _req(loaded, width=64, height=64))])
    small = StepBatch(loaded, max_images=3)
    with pytest.raises(ValueError, match=r"'y' cannot join.*3 of 3 images taken"):
        small.add_many([("w", reqs["a"]), ("v", reqs["c"]), ("y", reqs["b"])])
    assert len(batch) == 0 and batch.key is None and len(small) == 0
    calls, handles = _count_encoder_calls(loaded.pipeline)
    try:
        batch.add_many(list(reqs.items()))
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == 2  # three prompts, one call of each text encoder
    assert len(batch) == 4
    out = _drain(batch)
    for job_id, req in reqs.items():
        assert out[job_id][0].steps == req.num_inference_steps
        assert _diff(out[job_id][0], _generate(loaded, req)) <= TOL


def test_step_raises_pipeline_errors_and_keeps_state(
    loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = StepBatch(loaded)
    batch.add("a", _req(loaded))
    batch.step()

    def boom(*_a: Any, **_k: Any) -> None:
        raise torch.OutOfMemoryError("out of memory (injected)")

    monkeypatch.setattr(loaded.pipeline.transformer, "forward", boom)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        batch.step()
    assert batch.progress("a") == (1, 4)


def test_latents_preview_images_and_no_side_effect(loaded: LoadedPipeline) -> None:
    req = _req(loaded, seed=41, num_images=2)
    batch = StepBatch(loaded)
    batch.add("a", req)
    before = batch.latents_preview("a")  # the initial noise, decoded
    batch.step()
    batch.step()
    mid = batch.latents_preview("a")
    assert [im.size for im in before + mid] == [(32, 32)] * 4
    assert not np.array_equal(np.asarray(before[0]), np.asarray(mid[0]))
    with pytest.raises(KeyError):
        batch.latents_preview("nope")
    out = _drain(batch)
    assert _diff(out["a"][0], _generate(loaded, req)) == 0


# -- quantized denoisers ---------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "qtype"), [("quanto", "int8"), ("torchao", "int8wo")])
def test_quantized_denoiser_alone_and_joined(embedded_path: Path, backend: str, qtype: str) -> None:
    q = load_pipeline(
        QuantSettings(model=str(embedded_path), quant_backend=backend, quant_type=qtype)
    )
    assert supports_stepping(q)
    a = _req(q, seed=100)
    ref = _generate(q, a)
    assert _diff(_alone(q, a), ref) == 0  # measured: bit-identical
    batch = StepBatch(q)
    batch.add(
        "other", _req(q, prompt="a green star", seed=200, num_images=2, num_inference_steps=6)
    )
    batch.step()
    batch.add("a", a)
    assert _diff(_drain(batch)["a"][0], ref) <= TOL  # measured: 1 (quanto), 0 (torchao)


# -- prompt cache ----------------------------------------------------------------------------


def _count_encoder_calls(pipe: Any) -> tuple[list[int], Any]:
    calls = [0]
    handles = [
        enc.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for enc in (pipe.text_encoder, pipe.text_encoder_2)
    ]
    return calls, handles


def test_prompt_cache_skips_the_text_encoders_and_keeps_pixels(loaded: LoadedPipeline) -> None:
    cache = PromptCache(max_bytes=64 << 20)
    req = _req(loaded, seed=51, negative_prompt="a blue square")
    uncached = _alone(loaded, req)
    calls, handles = _count_encoder_calls(loaded.pipeline)
    try:
        first = _alone(loaded, req, prompt_cache=cache)
        assert calls[0] == 2  # prompt and negative in one call of each text encoder
        assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
        second = _alone(loaded, replace(req, seed=52), prompt_cache=cache)
        third = _alone(loaded, req, prompt_cache=cache)
        # A text seen as a negative prompt is a hit as a prompt too (same embeddings).
        _alone(loaded, _req(loaded, prompt="a blue square"), prompt_cache=cache)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == 2
    assert (cache.hits, cache.misses) == (5, 2)
    assert _diff(first, uncached) == 0 and _diff(third, uncached) == 0
    assert _diff(second, uncached) > 0  # another seed: the cache did not freeze the image
    assert cache.bytes > 0 and cache.bytes == cache.stats()["bytes"]


def test_prompt_cache_returns_the_encoded_tensors_themselves(loaded: LoadedPipeline) -> None:
    cache = PromptCache(max_bytes=64 << 20)
    batch = StepBatch(loaded, prompt_cache=cache)
    batch.add("a", _req(loaded))
    key = batch.prompt_key("a red circle on the left")
    assert key[0] == variant_id(loaded)
    cached = cache.get(key)
    assert cached is not None
    with torch.no_grad():
        direct = loaded.pipeline.encode_prompt(
            prompt=["a red circle on the left"],
            prompt_2=None,
            max_sequence_length=loaded.defaults.max_sequence_length,
        )
    assert all(torch.equal(c, d) for c, d in zip(cached, direct, strict=True))


def _entry(n: int) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(n, dtype=torch.float32),)  # 4n bytes


def test_prompt_cache_lru_eviction_by_bytes() -> None:
    cache = PromptCache(max_bytes=1000)
    cache.put(("v", "a", "k"), _entry(100))  # 400 bytes
    cache.put(("v", "b", "k"), _entry(100))
    assert cache.bytes == 800
    assert cache.get(("v", "a", "k")) is not None  # a is now the most recent
    cache.put(("v", "c", "k"), _entry(100))  # 1200 > 1000: evicts b, the least recent
    assert ("v", "b", "k") not in cache and ("v", "a", "k") in cache
    assert (cache.bytes, cache.evictions, len(cache)) == (800, 1, 2)
    cache.put(("v", "huge", "k"), _entry(300))  # over the bound alone: returned, not kept
    assert ("v", "huge", "k") not in cache and cache.bytes == 800
    cache.put(("v", "a", "k"), _entry(50))  # replacing an entry re-counts its bytes
    assert cache.bytes == 600
    assert cache.get(("v", "zzz", "k")) is None
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "evictions": 1,
        "bytes": 600,
        "entries": 2,
        "max_bytes": 1000,
    }
    assert cache.drop_variant("v") == 2 and cache.bytes == 0
    assert tensor_bytes((torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2))) == 14
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PromptCache(-1)


# -- CUDA (bf16) -----------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_alone_and_joined_within_tolerance(embedded_path: Path) -> None:
    """The same guarantee on a GPU in bf16 (the compute dtype `auto` picks on CUDA)."""
    q = load_pipeline(QuantSettings(model=str(embedded_path), device="cuda"))
    a = _req(q, seed=100)
    ref = generate(q, a)
    assert _diff(_alone(q, a), ref) <= TOL
    batch = StepBatch(q)
    batch.add("other", _req(q, prompt="a green star", seed=200, num_images=2))
    batch.step()
    batch.add("a", a)
    assert _diff(_drain(batch)["a"][0], ref) <= TOL
