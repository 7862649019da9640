"""Sizes: the one grammar of every size setting (`QDS_MEMORY_BUDGET`, `QDS_CACHE_MEMORY_BUDGET`,
`QDS_MAX_BODY_BYTES`, `qdserve plan --memory`, ...) and how sizes are printed."""

from __future__ import annotations

import re

# Bytes, or a number (decimals and a lowercase exponent allowed: `1.5GB`, `1e9`) with a unit
# of any case: 1000-based (`KB`, `MB`, `GB`, `TB`, or just `k`, `m`, `g`, `t`) unless it has an
# `i` (`KiB`, `MiB`, `GiB`, `TiB`, `Gi`): 1024-based. `b` alone is bytes.
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?(?:e[0-9]+)?)\s*((?i:[kmgt]i?b?|b)?)\s*")
_POWERS = "_kmgt"


def parse_bytes(value: object, name: str | None = None) -> int:
    """`17179869184`, `16GB` (10^9), `16GiB` (2^30), `1.5e3MB` -> bytes; an int as it is.

    ValueError when `value` is not a size; its message starts with `NAME=value` when `name`
    (the variable or flag the value came from) is given.
    """
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value))
    if not match:
        where = f"{name}={value!r}" if name else repr(value)
        raise ValueError(
            f"{where} is not a size; use bytes or a number with a unit: "
            "16GB (10^9 bytes), 16GiB (2^30), MB, MiB, TB"
        )
    unit = match.group(2).lower()
    base = 1024 if "i" in unit else 1000
    power = _POWERS.index(unit[0]) if unit and unit[0] in _POWERS else 0
    return int(float(match.group(1)) * base**power)


def parse_optional_bytes(value: object, name: str | None = None) -> int | None:
    """`parse_bytes` for a setting where unset, empty and 0 all mean no limit: those -> None."""
    if value is None or value == "" or value == 0 or value == "0":
        return None
    return parse_bytes(value, name)


def human(n: float) -> str:
    """Bytes in GB (10^9) or MB, as the benchmark reports print them."""
    if abs(n) >= 10**9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.2f} MB"
