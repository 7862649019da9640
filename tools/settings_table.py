"""Render the README's settings table from the pydantic settings classes.

`python tools/settings_table.py` prints it; `--write` replaces the block between the
`<!-- settings:start -->` / `<!-- settings:end -->` markers in README.md. A test checks that
the README's block equals this output, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from doc_blocks import write_block  # noqa: E402

BLOCK = "settings"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    value = field.default
    if value is None:
        return "(unset)"
    return str(getattr(value, "value", value))


def render() -> str:
    from quantization.settings import QuantSettings
    from service.settings import ServiceSettings

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for cls in (QuantSettings, ServiceSettings):
        for name, field in cls.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            default = _default(field).replace("|", "\\|") or "(empty)"
            lines.append(f"| `QDS_{name.upper()}` | `{default}` | {desc} |")
    return "\n".join(lines)


def write(readme: Path = ROOT / "README.md") -> None:
    write_block(readme, BLOCK, render())


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
    else:
        print(render())
