"""Regenerate images.json from OpenAI's published OpenAPI description.

    git clone https://github.com/openai/openai-openapi && cd openai-openapi
    python <qdserve>/tests/schemas/openai/extract.py openapi.yaml $(git rev-parse HEAD) \
        > <qdserve>/tests/schemas/openai/images.json

Copies the named schemas and everything they reference (transitively), unchanged, under
`components.schemas`, so `#/components/schemas/...` references resolve inside the file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

ROOTS = (
    "ImagesResponse",
    "ImageGenStreamEvent",
    "ImageEditStreamEvent",
    "ImageGenPartialImageEvent",
    "ImageGenCompletedEvent",
    "ImageEditPartialImageEvent",
    "ImageEditCompletedEvent",
)
PREFIX = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"][len(PREFIX) :]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def extract(spec: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    todo, picked = list(roots), {}
    while todo:
        name = todo.pop()
        if name not in picked:
            picked[name] = schemas[name]
            todo.extend(refs(schemas[name]))
    return dict(sorted(picked.items()))


def main() -> None:
    path, commit = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    doc = {
        "source": {
            "repository": "https://github.com/openai/openai-openapi",
            "file": "openapi.yaml",
            "commit": commit,
            "info.version": spec["info"]["version"],
        },
        "components": {"schemas": extract(spec)},
    }
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
