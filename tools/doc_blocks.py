"""Generated blocks inside hand-written docs, between `<!-- name:start -->` / `<!-- name:end -->`.

The README's settings table and docs/observability.md's metric table are rendered from code;
their tests compare the block in the doc with a fresh render.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_block(doc: Path, name: str) -> str:
    start, end = markers(name)
    return doc.read_text().split(start, 1)[1].split(end, 1)[0].strip()


def write_block(doc: Path, name: str, body: str) -> None:
    start, end = markers(name)
    head, _, rest = doc.read_text().partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{body}\n{end}{tail}")
