"""QDS_STEP_CACHE and the `step_cache` request field: one grammar (pipelines.step_cache),
validated where it enters (settings at start, the protocol per request), resolved once in the
HTTP process (the request's own value, else the server's), shown on the model cards."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from pipelines.loader import ModelDefaults
from service.processor import ImageParams, resolve
from service.protocol import GenerateRequest, ImageGenerationRequest, ModelCard
from service.settings import ServiceSettings

DEFAULTS = ModelDefaults(size=32, steps=4, guidance=3.5, size_multiple=16)


def test_setting_is_validated_and_canonical(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings.model_fields["step_cache"].default == "taylorseer:6"
    assert ServiceSettings(step_cache="FBCache:0.20").step_cache == "fbcache:0.2"
    assert ServiceSettings(step_cache="taylorseer:03").step_cache == "taylorseer:3"
    monkeypatch.setenv("QDS_STEP_CACHE", "fbcache:0.1")
    assert ServiceSettings().step_cache == "fbcache:0.1"
    for bad in ("fbcache", "fbcache:2", "teacache:0.1", "taylorseer:0", "taylorseer:x"):
        with pytest.raises(ValidationError, match="step_cache"):
            ServiceSettings(step_cache=bad)


@pytest.mark.parametrize("model", [ImageGenerationRequest, GenerateRequest])
def test_request_field_is_validated(model: type) -> None:
    assert model.model_validate({"prompt": "x", "step_cache": "fbcache:0.30"}).step_cache == (
        "fbcache:0.3"
    )
    assert model.model_validate({"prompt": "x"}).step_cache is None
    with pytest.raises(ValidationError) as info:
        model.model_validate({"prompt": "x", "step_cache": "fbcache:abc"})
    assert info.value.errors()[0]["loc"] == ("step_cache",)


def test_resolve_takes_the_request_value_else_the_setting() -> None:
    settings = ServiceSettings(step_cache="fbcache:0.2")
    body = ImageGenerationRequest.model_validate({"prompt": "x"})
    assert resolve(ImageParams.from_body(body), settings, DEFAULTS).step_cache == "fbcache:0.2"
    for asked in ("off", "fbcache:0.05"):
        body = ImageGenerationRequest.model_validate({"prompt": "x", "step_cache": asked})
        assert resolve(ImageParams.from_body(body), settings, DEFAULTS).step_cache == asked
    plain = ImageGenerationRequest.model_validate({"prompt": "x"})
    off = ServiceSettings(step_cache="off")
    assert resolve(ImageParams.from_body(plain), off, DEFAULTS).step_cache == "off"


def test_model_card_has_the_setting() -> None:
    assert "step_cache" in ModelCard.model_fields


def test_step_key_ignores_the_cache_and_the_whole_call_key_does_not() -> None:
    from types import SimpleNamespace

    from pipelines.generate import GenerationRequest, batch_key
    from pipelines.stepping import step_key

    loaded = SimpleNamespace(defaults=DEFAULTS)
    a = GenerationRequest(
        "x", seed=1, width=32, height=32, num_inference_steps=4, guidance_scale=3.5
    )
    b = replace(a, step_cache="fbcache:0.2")
    assert step_key(loaded, a) == step_key(loaded, b)  # type: ignore[arg-type]
    assert batch_key(loaded, a) != batch_key(loaded, b)  # type: ignore[arg-type]
