"""Unit tier for the request path's pure parts: the protocol's schema rules, the one resolve
step, the model-variant module and the domain-error -> HTTP table. No server, no model."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from engine.failures import (
    BackendUnavailable,
    ModelLoadFailed,
    ModelNotLoaded,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
)
from pipelines.loader import ModelDefaults
from quantization.settings import QuantSettings
from service.errors import HTTP_MAPPING, to_api_error, validation_error
from service.exceptions import InvalidValue, ModelNotFound, RequestTimeout
from service.processor import ImageParams, check_limits, resolve
from service.protocol import GenerateRequest, ImageGenerationRequest
from service.settings import ServiceSettings
from service.variants import Variants, format_id, parse_spec

MODEL = "qdserve/embedded-flux"
DEFAULTS = ModelDefaults(size=32, steps=4, guidance=3.5, size_multiple=16)


def _settings(**kw: object) -> ServiceSettings:
    base = {"max_pixels": 64 * 64, "max_steps": 8, "max_images": 4, "max_prompt_chars": 50}
    return ServiceSettings(**{**base, **kw})


def _params(body: dict) -> ImageParams:
    return ImageParams.from_body(ImageGenerationRequest.model_validate(body))


def _native(body: dict) -> ImageParams:
    return ImageParams.from_body(GenerateRequest.model_validate(body))


# -- protocol ---------------------------------------------------------------------------------


def test_openai_body_with_fields_we_do_not_know_is_accepted() -> None:
    # What newer openai clients send (stream, partial_images, safety_identifier, new quality
    # values): ignored on the OpenAI route, so the official client keeps working.
    body = ImageGenerationRequest.model_validate(
        {
            "prompt": "x",
            "quality": "xhigh",
            "stream": False,
            "partial_images": 0,
            "safety_identifier": "u1",
            "output_format": None,
        }
    )
    assert _params(body.model_dump()).output_format == "png"


def test_native_body_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        GenerateRequest.model_validate({"prompt": "x", "stepz": 3})
    assert exc.value.errors()[0]["loc"] == ("stepz",)


def test_schema_states_the_config_independent_rules() -> None:
    schema = ImageGenerationRequest.model_json_schema()["properties"]

    def variant(name: str) -> dict:
        prop = schema[name]
        return next((p for p in prop.get("anyOf", []) if p.get("type") != "null"), prop)

    assert variant("output_format")["enum"] == ["png", "jpeg", "webp"]
    assert variant("response_format")["const"] == "b64_json"
    assert "none" in variant("quant_backend")["enum"]
    assert (schema["n"]["minimum"], schema["n"]["maximum"]) == (1, 10)
    assert (
        variant("num_inference_steps")["minimum"],
        variant("output_compression")["maximum"],
    ) == (
        1,
        100,
    )
    assert variant("size")["pattern"].startswith("^(auto|")
    native = GenerateRequest.model_json_schema()["properties"]
    assert next(p for p in native["width"]["anyOf"] if p["type"] == "integer")["minimum"] == 1


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "x", "size": "big"}, "size", "invalid_size"),
        ({"prompt": "x", "size": "0x32"}, "size", "invalid_size"),
        (
            {"prompt": "x", "response_format": "url"},
            "response_format",
            "unsupported_response_format",
        ),
        ({"prompt": "x", "n": 11}, "n", "invalid_value"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "invalid_value"),
        ({"n": 1}, "prompt", "missing_required_parameter"),
    ],
)
def test_schema_errors_keep_openai_param_and_code(body: dict, param: str, code: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ImageGenerationRequest.model_validate(body)
    # What FastAPI hands the handler: the same errors under a "body" location.
    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.value.errors()]
    err = validation_error(RequestValidationError(errors))
    assert (err.status, err.param, err.code) == (400, param, code)
    assert err.message.startswith(f"{param}: ")


# -- the resolve step -------------------------------------------------------------------------


def test_resolve_fills_every_default_once() -> None:
    gen = resolve(_params({"prompt": "x"}), _settings(), DEFAULTS)
    assert (gen.width, gen.height, gen.num_inference_steps, gen.guidance_scale) == (32, 32, 4, 3.5)
    assert gen.seed is not None
    # A resolved request resolves to itself (the batch key resolves again).
    assert resolve(_params({"prompt": "x", "seed": gen.seed}), _settings(), DEFAULTS) == gen


def test_resolve_step_precedence_request_then_setting_then_model() -> None:
    settings = _settings(default_steps=6)
    assert resolve(_params({"prompt": "x"}), settings, DEFAULTS).num_inference_steps == 6
    given = _params({"prompt": "x", "num_inference_steps": 2})
    assert resolve(given, settings, DEFAULTS).num_inference_steps == 2


def test_size_from_either_protocol() -> None:
    assert (_params({"prompt": "x", "size": "48x16"}).width, _params({"prompt": "x"}).width) == (
        48,
        None,
    )
    gen = resolve(_native({"prompt": "x", "height": 16}), _settings(), DEFAULTS)
    assert (gen.width, gen.height, gen.num_images) == (32, 16, 1)


@pytest.mark.parametrize(
    ("params", "param", "code", "text"),
    [
        (_params({"prompt": "x", "size": "40x32"}), "size", "invalid_size", "multiple of 16"),
        (_native({"prompt": "x", "height": 40}), "height", "invalid_size", "height 40"),
        (_params({"prompt": "x", "size": "128x128"}), "size", "size_too_large", "QDS_MAX_PIXELS"),
        (_native({"prompt": "x", "width": 144}), "width", "size_too_large", "model's default"),
        (_params({"prompt": " "}), "prompt", "invalid_value", "must not be empty"),
        (_params({"prompt": "x" * 51}), "prompt", "prompt_too_long", "QDS_MAX_PROMPT_CHARS=50"),
        (_params({"prompt": "x", "n": 5}), "n", "invalid_value", "QDS_MAX_IMAGES"),
        (
            _params({"prompt": "x", "num_inference_steps": 9}),
            "num_inference_steps",
            "invalid_value",
            "QDS_MAX_STEPS",
        ),
    ],
)
def test_resolve_refuses_with_the_field_at_fault(
    params: ImageParams, param: str, code: str, text: str
) -> None:
    with pytest.raises(InvalidValue) as exc:  # what the processor runs, in its order
        check_limits(params, _settings())
        resolve(params, _settings(), DEFAULTS)
    assert (exc.value.param, exc.value.code) == (param, code)
    assert text in exc.value.message


def test_default_size_over_the_pixel_limit_is_caught_with_the_model() -> None:
    params = _params({"prompt": "x"})
    check_limits(params, _settings(max_pixels=256))  # nothing to check before the model
    with pytest.raises(InvalidValue, match="model's default size 32x32 exceeds QDS_MAX_PIXELS"):
        resolve(params, _settings(max_pixels=256), DEFAULTS)


# -- model variants ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants() -> Variants:
    return Variants(QuantSettings())


def test_id_format_round_trip() -> None:
    assert format_id(MODEL, "torchao", "int8wo") == f"{MODEL}:torchao:int8wo"
    assert format_id(MODEL, "none") == f"{MODEL}:none"
    assert parse_spec("torchao:int8wo") == ("torchao", "int8wo")
    assert parse_spec(" quanto ") == ("quanto", None)


def test_select_default_by_any_of_its_names(variants: Variants) -> None:
    for model in (None, "embedded", MODEL, f"{MODEL}:none"):
        assert variants.select(model, None, None)[0] == variants.default_key
    assert variants.public_id(variants.default_key) == MODEL


def test_select_variant_by_id_or_fields(variants: Variants) -> None:
    by_id, settings = variants.select(f"{MODEL}:torchao:int8wo", None, None)
    by_fields, _ = variants.select(None, "torchao", "int8wo")
    assert by_id == by_fields and settings.quant_backend == "torchao"
    assert variants.public_id(by_id) == f"{MODEL}:torchao:int8wo"
    # The backend's default quant type is filled in, so both spellings share a cache entry.
    assert variants.select(None, "quanto", None)[0] == variants.select(None, "quanto", "int8")[0]


@pytest.mark.parametrize(
    ("model", "backend", "qtype", "error", "param"),
    [
        ("dall-e-3", None, None, ModelNotFound, "model"),
        (f"{MODEL}:nope", None, None, InvalidValue, "quant_backend"),
        (f"{MODEL}:torchao", "quanto", None, InvalidValue, "quant_backend"),
        (f"{MODEL}:torchao:int8wo", None, "int8dq", InvalidValue, "quant_type"),
        (None, "quanto", "int7", InvalidValue, "quant_type"),
        # A settings rule (gguf needs a file) that is not about the request's own fields.
        (None, "gguf", None, InvalidValue, "quant_backend"),
    ],
)
def test_select_errors_name_the_field(
    variants: Variants, model: str | None, backend: str | None, qtype: str | None, error, param
) -> None:
    with pytest.raises(error) as exc:
        variants.select(model, backend, qtype)
    assert exc.value.param == param


def test_preload_entries_and_their_warnings(variants: Variants) -> None:
    loaded, warnings = variants.preload(["torchao:int8wo", "none", "quanto:int7"])
    assert [k.variant_id for k in loaded] == [f"{MODEL}:torchao:int8wo"]  # none is the default
    assert len(warnings) == 1 and "'quanto:int7'" in warnings[0] and "int7" in warnings[0]


def test_cards_default_first_and_found_by_either_id(variants: Variants) -> None:
    preload, _ = variants.preload(["torchao:int8wo"])
    cards = variants.cards([], preload)
    assert [c.id for c in cards] == [MODEL, f"{MODEL}:torchao:int8wo"]
    assert cards[0].default and not cards[0].loaded
    assert variants.find_card(cards, f"{MODEL}:none") is cards[0]
    with pytest.raises(ModelNotFound):
        variants.find_card(cards, "nope")


# -- domain errors -> HTTP --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "param", "code", "kind"),
    [
        (InvalidValue("bad", param="n"), 400, "n", "invalid_value", "validation"),
        (ModelNotFound("no"), 404, "model", "model_not_found", "validation"),
        (ModelNotLoaded("off"), 400, "quant_backend", "model_not_loaded", "validation"),
        (BackendUnavailable("gpu"), 400, "quant_backend", "backend_unavailable", "validation"),
        (QueueFull("full", retry_after=3), 429, None, "queue_full", "rejected"),
        (RequestTimeout("late"), 504, None, "timeout", "timeout"),
        (ShuttingDown(), 503, None, "shutting_down", None),
        (OutOfMemory("oom"), 503, None, "out_of_memory", "oom"),
        (ModelLoadFailed("load"), 503, None, "model_load_failed", "internal"),
    ],
)
def test_one_table_maps_domain_errors(exc, status: int, param, code: str, kind) -> None:
    err = to_api_error(exc)
    assert (err.status, err.param, err.code, err.kind) == (status, param, code, kind)
    assert err.message == exc.message
    if isinstance(exc, QueueFull):
        assert err.headers == {"Retry-After": "3"}
    assert type(exc) in HTTP_MAPPING
