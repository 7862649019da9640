"""The `lora` field of multipart requests (image edits): what clients send, as a list.

The official openai client flattens `extra_body={"lora": [{"name": ..., "scale": ...}]}` of a
multipart request into repeated `lora[][name]` / `lora[][scale]` parts (its "brackets" array
format); curl users more naturally send one `lora` part holding JSON. Both become the list the
request model validates, so edits take the same field as generations.
"""

from __future__ import annotations

import json
import re

from service.exceptions import InvalidValue

_ITEM = re.compile(r"^lora\[(\d*)\]\[([a-z_]+)\]$")


def is_lora_field(name: str) -> bool:
    return name == "lora" or name.startswith("lora[")


def form_lora(parts: list[tuple[str, str]]) -> list[dict[str, str]] | list[object]:
    """`lora` parts in arrival order -> the list of adapters (values still strings; the
    request model converts and checks them)."""
    if len(parts) == 1 and parts[0][0] == "lora":
        try:
            value = json.loads(parts[0][1])
        except json.JSONDecodeError:
            raise InvalidValue(
                'lora must be JSON, e.g. [{"name": "orange", "scale": 1.0}]', param="lora"
            ) from None
        if not isinstance(value, list):
            raise InvalidValue("lora must be a JSON list of {name, scale}", param="lora")
        return value
    entries: list[dict[str, str]] = []
    indexed: dict[int, dict[str, str]] = {}
    for key, value in parts:
        match = _ITEM.match(key)
        if match is None:
            raise InvalidValue(
                f"unexpected field {key!r}: send lora as JSON in one part, or as "
                "lora[][name] / lora[][scale] parts",
                param="lora",
            )
        index, attr = match.groups()
        if index:  # lora[0][name]: explicit positions
            target = indexed.setdefault(int(index), {})
        else:  # lora[][name]: a repeated attribute starts the next entry
            if not entries or attr in entries[-1]:
                entries.append({})
            target = entries[-1]
        if attr in target:
            raise InvalidValue(f"{key} is given more than once", param="lora")
        target[attr] = value
    if entries and indexed:
        raise InvalidValue("mix of lora[] and lora[N] parts", param="lora")
    return entries or [indexed[i] for i in sorted(indexed)]
