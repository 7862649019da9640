"""Model variants: the one place that knows the model-id format and the served variants.

A variant is one cache entry: (model, backend, quant type, compute dtype). Its public id is
`model[:backend[:quant_type]]`; the default variant also answers to the bare model id (and to
`embedded` / the configured `QDS_MODEL`). This module builds and parses those ids, turns a
request's `model` / `quant_backend` / `quant_type` into a variant, parses `QDS_PRELOAD`
entries (`backend[:quant_type]`) and builds the cards of `GET /v1/models`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from engine.keys import SEP, ModelKey, format_id, key_for, model_id, parse_spec
from quantization.backends import BACKENDS
from quantization.settings import QuantSettings
from service.exceptions import InvalidValue, ModelNotFound
from service.protocol import ModelCard

if TYPE_CHECKING:
    from engine.cache import Entry
    from pipelines.lora import LoraSpec

# QuantSettings fields a request can choose; any other field that fails validation for a
# requested variant is server configuration that does not fit the chosen backend.
_REQUEST_FIELDS = ("quant_backend", "quant_type")


def settings_field(exc: ValidationError) -> str | None:
    """The settings field a validation error is about.

    Field validators put it in `loc`; a model validator has no `loc`, so its ValueError may
    carry a `field` attribute (pydantic keeps the original exception in `ctx["error"]`).
    """
    err = exc.errors()[0]
    loc = err.get("loc") or ()
    if loc:
        return str(loc[0])
    original = (err.get("ctx") or {}).get("error")
    return getattr(original, "field", None)


def first_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return str(err.get("msg", exc)).removeprefix("Value error, ")


class Variants:
    """The variants of the configured model: the default one and those a request names."""

    def __init__(self, default: QuantSettings) -> None:
        self.default = default
        self.default_key = key_for(default)
        self.model_id = model_id(default)
        # Every name of the default model; "model:backend[:type]" may follow any of them.
        self._aliases = tuple(dict.fromkeys(("embedded", self.model_id, default.model)))

    # -- ids -----------------------------------------------------------------------------
    def public_id(self, key: ModelKey) -> str:
        """The default variant is named by the bare model id; others by model:backend[:type]."""
        return key.model if key == self.default_key else key.variant_id

    def parse_model(self, model: str) -> tuple[str | None, str | None]:
        """A request's `model` -> (backend, quant_type) it names; (None, None) = the default."""
        for alias in self._aliases:
            if model == alias:
                return None, None
            if model.startswith(alias + SEP):
                return parse_spec(model[len(alias) + 1 :])
        raise ModelNotFound(
            f"model {model!r} is not served here; GET /v1/models lists the ids "
            f"(e.g. {self.model_id!r})"
        )

    # -- choosing a variant --------------------------------------------------------------
    def select(
        self, model: str | None, quant_backend: str | None, quant_type: str | None
    ) -> tuple[ModelKey, QuantSettings]:
        """The cache variant a request asks for (by model id, by backend fields, or both)."""
        backend, qtype = quant_backend, quant_type
        if model:
            m_backend, m_qtype = self.parse_model(model)
            if m_backend is not None:
                if backend is not None and backend != m_backend:
                    raise InvalidValue(
                        f"quant_backend {backend!r} contradicts model {model!r}",
                        param="quant_backend",
                    )
                if qtype is not None and m_qtype is not None and qtype != m_qtype:
                    raise InvalidValue(
                        f"quant_type {qtype!r} contradicts model {model!r}", param="quant_type"
                    )
                backend, qtype = m_backend, qtype or m_qtype
        if backend is None and qtype is None:
            return self.default_key, self.default
        variant = self.settings_for(
            backend if backend is not None else self.default.quant_backend, qtype
        )
        key = key_for(variant)
        return (key, self.default) if key == self.default_key else (key, variant)

    def settings_for(self, backend: str, quant_type: str | None) -> QuantSettings:
        """The default settings with another backend / quant type, checked as request fields."""
        strategy = BACKENDS.get(backend)
        if strategy is None:
            raise InvalidValue(
                f"quant_backend {backend!r} is not a backend; allowed: {', '.join(BACKENDS)}",
                param="quant_backend",
            )
        resolved = quant_type or strategy.default_quant_type
        if strategy.quant_types and resolved not in strategy.quant_types:
            raise InvalidValue(
                f"quant_type {quant_type!r} is not a quant type of backend {backend!r}; "
                f"allowed: {', '.join(strategy.quant_types)}",
                param="quant_type",
            )
        try:
            return self.default.with_backend(backend, quant_type)
        except ValidationError as exc:
            field = settings_field(exc)
            raise InvalidValue(
                f"{format_id(self.model_id, backend, quant_type)} cannot be served with this "
                f"server's configuration: {first_message(exc)}",
                param=field if field in _REQUEST_FIELDS else "quant_backend",
            ) from None

    def preload(self, specs: Iterable[str]) -> tuple[dict[ModelKey, QuantSettings], list[str]]:
        """QDS_PRELOAD entries -> the variants to load at start-up, and a warning per bad one."""
        variants: dict[ModelKey, QuantSettings] = {}
        warnings: list[str] = []
        for spec in specs:
            backend, qtype = parse_spec(spec)
            try:
                variant = self.settings_for(backend, qtype)
            except InvalidValue as exc:
                warnings.append(f"QDS_PRELOAD entry {spec!r} is invalid: {exc.message}")
                continue
            key = key_for(variant)
            if key != self.default_key:
                variants[key] = variant
        return variants, warnings

    # -- model cards ---------------------------------------------------------------------
    def cards(
        self,
        entries: Iterable[Entry],
        preloads: Iterable[ModelKey],
        loras: Sequence[LoraSpec] = (),
    ) -> list[ModelCard]:
        """The default variant first, then preloads, then anything else loaded; each lists
        the declared LoRA adapters (`loras`) with their state in that variant."""
        by_key = {e.key: e for e in entries}
        keys = list(dict.fromkeys([self.default_key, *preloads, *by_key]))
        cards = []
        for key in keys:
            entry = by_key.get(key)
            cards.append(
                ModelCard(
                    id=self.public_id(key),
                    created=int(entry.loaded_at) if entry else 0,
                    model=key.model,
                    backend=key.backend,
                    quant_type=key.quant_type,
                    compute_dtype=key.compute_dtype,
                    loaded=entry is not None,
                    default=key == self.default_key,
                    storage_bytes=entry.storage_bytes if entry else None,
                    in_use=entry.in_use if entry else 0,
                    loras=lora_cards(loras, entry),
                    plan=getattr(entry, "plan", None),
                )
            )
        return cards

    @staticmethod
    def find_card(cards: Iterable[ModelCard], wanted: str) -> ModelCard:
        """A card by its public id or its full model:backend[:type] id."""
        for card in cards:
            if wanted in (card.id, format_id(card.model, card.backend, card.quant_type)):
                return card
        raise ModelNotFound(f"model {wanted!r} is not listed")


def lora_cards(declared: Sequence[LoraSpec], entry: Any) -> list[dict[str, Any]]:
    """Each declared adapter in one variant: "loaded" (with rank and bytes), "not loaded"
    (the variant is not), or "unsupported" (its backend cannot take a LoRA: the reason)."""
    loaded = {info["name"]: info for info in getattr(entry, "loras", ())}
    error = getattr(entry, "lora_error", "")
    out = []
    for spec in declared:
        # No "source": file paths and hub ids are the operator's (QDS_LORAS), not clients'.
        card: dict[str, Any] = {"name": spec.name}
        if entry is None:
            card["state"] = "not loaded"
        elif error:
            card.update(state="unsupported", reason=error)
        else:
            card.update({k: v for k, v in loaded.get(spec.name, {}).items() if k != "source"})
            card["state"] = "loaded" if spec.name in loaded else "not loaded"
        out.append(card)
    return out
