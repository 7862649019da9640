"""pipelines/edit.py on the embedded model (random weights, 32x32, few steps): img2img and
inpainting share every weight of the loaded pipeline, on every CPU backend, with generation's
seed rules and diffusers' strength semantics."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import edit
from pipelines.generate import GenerationRequest, batch_key
from pipelines.loader import LoadedPipeline, load_pipeline, prepare
from pipelines.token_usage import image_tokens
from quantization.backends import get_backend
from quantization.environment import DeviceInfo
from quantization.settings import QuantSettings

SIZE = 32


def _source() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    img.paste((220, 30, 30), (4, 10, 14, 22))
    return img


def _left_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    return mask


def _request(**kw: Any) -> edit.EditRequest:
    base: dict[str, Any] = {
        "prompt": "a blue square on the left",
        "image": _source(),
        "num_inference_steps": 2,
        "seed": 3,
        "width": SIZE,
        "height": SIZE,
    }
    return edit.EditRequest(**{**base, **kw})


def _tensors(module: torch.nn.Module) -> dict[str, int]:
    out = {f"p:{n}": p.data_ptr() for n, p in module.named_parameters()}
    out.update({f"b:{n}": b.data_ptr() for n, b in module.named_buffers()})
    return out


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on CPUs shared with other work, torch's default two spin against
    each other (this module ran 5x slower with them)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(embedded_path: Path) -> LoadedPipeline:
    return load_pipeline(QuantSettings(model=str(embedded_path)))


def test_denoise_steps_match_diffusers_get_timesteps() -> None:
    # diffusers: t_start = int(steps - steps * strength); steps run = steps - t_start.
    assert [edit.denoise_steps(12, s) for s in (1.0, 0.8, 0.6, 0.3, 0.05)] == [12, 10, 8, 4, 1]
    assert edit.denoise_steps(4, 0.5) == 2
    assert edit.denoise_steps(10, 0.0) == 0


def test_auto_size_keeps_input_size_scaled_to_the_pixel_limit() -> None:
    assert edit.auto_size((32, 32), 16, 1024 * 1024) == (32, 32)
    assert edit.auto_size((1000, 750), 16, 1024 * 1024) == (992, 736)
    # Scaled down to fit, aspect kept, sides multiples.
    w, h = edit.auto_size((4000, 3000), 16, 1024 * 1024)
    assert w * h <= 1024 * 1024 and (w % 16, h % 16) == (0, 0) and abs(w / h - 4 / 3) < 0.02
    assert edit.auto_size((3, 5), 16, 1024) == (16, 16)


def test_strength_defaults_and_key_separate_edits_from_generations(
    loaded: LoadedPipeline,
) -> None:
    img2img = edit.resolve(loaded.defaults, _request())
    inpaint = edit.resolve(loaded.defaults, _request(mask=_left_mask()))
    assert (img2img.strength, inpaint.strength) == (0.6, 1.0)
    assert edit.edit_key(loaded, img2img) != edit.edit_key(loaded, inpaint)
    same = edit.resolve(loaded.defaults, _request(seed=9, strength=0.6))
    assert edit.edit_key(loaded, img2img) == edit.edit_key(loaded, same)
    weaker = edit.resolve(loaded.defaults, _request(strength=0.5))
    assert edit.edit_key(loaded, img2img) != edit.edit_key(loaded, weaker)
    with pytest.raises(ValueError, match="not final"):  # the engine takes requests final
        edit.edit_key(loaded, _request())
    gen = GenerationRequest(
        prompt="x", num_inference_steps=4, seed=3, width=SIZE, height=SIZE, guidance_scale=3.5
    )
    assert edit.edit_key(loaded, img2img) != batch_key(loaded, gen)


def test_derived_pipelines_share_every_weight_and_are_cached(loaded: LoadedPipeline) -> None:
    pipe = loaded.pipeline
    before = {n: _tensors(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    dtypes = {
        n: {p.dtype for p in m.parameters()}
        for n, m in pipe.components.items()
        if isinstance(m, torch.nn.Module)
    }
    for kind in ("img2img", "inpaint"):
        derived = edit.derived_pipeline(pipe, kind)
        assert derived is edit.derived_pipeline(pipe, kind)
        assert (
            type(derived).__name__
            == {"img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}[kind]
        )
        for name, tensors in before.items():
            module = getattr(derived, name)
            assert module is getattr(pipe, name)
            assert _tensors(module) == tensors, f"{kind}: {name} has new storage"
        # Its own scheduler: set_timesteps on it must not touch the generation pipeline's.
        assert derived.scheduler is not pipe.scheduler
    edit.edit(loaded, _request(mask=_left_mask()))
    after = {n: _tensors(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert after == before
    assert {
        n: {p.dtype for p in m.parameters()}
        for n, m in pipe.components.items()
        if isinstance(m, torch.nn.Module)
    } == dtypes


def test_img2img_seeds_strength_and_batching(loaded: LoadedPipeline) -> None:
    alone = edit.edit(loaded, _request(num_images=2))
    assert alone.seeds == [3, 4] and len(alone.images) == 2
    assert alone.images[0].size == (SIZE, SIZE)
    # 2 steps at the default 0.6: diffusers runs 2 - int(2 - 1.2) = 2.
    assert alone.steps == 2
    assert alone.usage is not None and alone.usage.image_tokens == image_tokens(
        loaded.pipeline, SIZE, SIZE
    )
    # Image 1 of a request is image 0 of a request with seed + 1, also inside a batch.
    second = edit.edit(loaded, _request(seed=4))
    assert np.abs(_pixels(alone.images[1]) - _pixels(second.images[0])).max() <= 2
    batched = edit.edit_batch(
        loaded, [edit.resolve(loaded.defaults, _request(seed=s)) for s in (4, 3)]
    )
    assert np.abs(_pixels(batched[1].images[0]) - _pixels(alone.images[0])).max() <= 2
    # A different seed gives a different image.
    assert np.abs(_pixels(alone.images[0]) - _pixels(alone.images[1])).mean() > 0.5


def test_strength_runs_diffusers_step_count(loaded: LoadedPipeline) -> None:
    # Random weights show nothing about closeness (that is examples/demo's edit check); the
    # steps that run are the semantics: 8 steps at 0.25 run 8 - int(8 - 2) = 2.
    steps: list[int] = []
    out = edit.edit(
        loaded,
        _request(strength=0.25, num_inference_steps=8),
        step_callback=lambda i, _s: steps.append(i),
    )
    assert steps == [0, 1] and out.steps == 2
    assert out.timings["schedule_steps"] == 8


def test_inpaint_changes_the_masked_area_only(loaded: LoadedPipeline) -> None:
    # Same seed, two prompts: the unmasked latents end as the input's own, so only the masked
    # (left) half and the VAE decoder's reach around its edge differ. Measured per-column mean
    # abs diff: ~1.6 on the left half, ~0.2 on the right quarter.
    def run(prompt: str) -> np.ndarray:
        return _pixels(edit.edit(loaded, _request(prompt=prompt, mask=_left_mask())).images[0])

    diff = np.abs(run("a blue square on the left") - run("a green triangle")).mean(axis=(0, 2))
    assert diff[: SIZE // 2].mean() > 3 * diff[3 * SIZE // 4 :].mean()


def test_mixed_batches_are_refused(loaded: LoadedPipeline) -> None:
    with pytest.raises(ValueError, match="share kind"):
        edit.edit_batch(
            loaded,
            [edit.resolve(loaded.defaults, r) for r in (_request(), _request(mask=_left_mask()))],
        )


def test_derived_pipelines_die_with_the_released_pipeline(embedded_path: Path) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path)))
    derived = weakref.ref(edit.derived_pipeline(loaded.pipeline, "inpaint"))
    transformer = weakref.ref(loaded.pipeline.transformer)
    loaded.release()
    gc.collect()
    assert derived() is None and transformer() is None


def test_model_without_edit_pipelines_is_refused_clearly() -> None:
    class Odd:
        scheduler = None
        config: ClassVar[dict[str, Any]] = {}
        components: ClassVar[dict[str, Any]] = {}

    with pytest.raises(edit.EditUnsupported, match="no inpainting pipeline"):
        edit.derived_pipeline(Odd(), "inpaint")


BACKENDS = [
    ("quanto", "int8"),
    ("torchao", "int8wo"),
    ("gguf", "Q8_0"),
    ("sdnq", "int8"),
]


@pytest.mark.parametrize(("backend", "qtype"), BACKENDS)
def test_edits_on_quantized_backends_share_the_quantized_weights(
    embedded_path: Path, tmp_path: Path, backend: str, qtype: str
) -> None:
    b = get_backend(backend)
    if why := b.unavailable_reason(qtype, DeviceInfo(False, "cpu")):
        pytest.skip(why)
    settings = QuantSettings.unprepared(
        model=str(embedded_path), quant_backend=backend, quant_type=qtype
    )
    loaded = load_pipeline(prepare(settings, tmp_path))
    before = _tensors(loaded.pipeline.transformer)
    for kind_mask in (None, _left_mask()):
        out = edit.edit(loaded, _request(mask=kind_mask))
        arr = _pixels(out.images[0])
        assert arr.shape == (SIZE, SIZE, 3) and np.isfinite(arr).all() and arr.std() > 0
    assert _tensors(loaded.pipeline.transformer) == before
    assert edit.derived_pipeline(loaded.pipeline, "inpaint").transformer is (
        loaded.pipeline.transformer
    )


def test_bf16_pipeline_is_not_cast_by_its_edit_pipelines(embedded_path: Path) -> None:
    # diffusers' FluxImg2ImgPipeline.from_pipe(pipe) would end with .to(torch.float32) and
    # cast the shared bf16 modules in place; the Auto classes used here do not cast.
    loaded = load_pipeline(QuantSettings(model=str(embedded_path), compute_dtype="bfloat16"))
    pipe = loaded.pipeline
    before = {n: _tensors(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for kind_mask in (None, _left_mask()):
        out = edit.edit(loaded, _request(mask=kind_mask))
        assert np.isfinite(_pixels(out.images[0])).all()
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    after = {n: _tensors(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert after == before


@pytest.mark.gpu
def test_edits_on_cuda_share_weights_and_reproduce_cpu_seeds(embedded_path: Path) -> None:
    loaded = load_pipeline(QuantSettings(model=str(embedded_path), device="cuda"))
    before = torch.cuda.memory_allocated()
    first = edit.edit(loaded, _request(mask=_left_mask(), num_images=2))
    again = edit.edit(loaded, _request(mask=_left_mask(), seed=4))
    # CPU generators: image 1 of seed 3 is image 0 of seed 4, on the GPU too.
    assert np.abs(_pixels(first.images[1]) - _pixels(again.images[0])).max() <= 2
    # The derived pipelines allocate no weights: what stays allocated after the calls is
    # what was there before (activations are freed).
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before * 1.01 + 2**20
