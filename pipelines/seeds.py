"""Per-image seeds and their generators: the one place that decides what noise an image gets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_SEED = 2**63 - 1


def image_seeds(seed: int, n: int) -> list[int]:
    """Per-image seeds derived from the request seed: image i of a request uses seed + i.

    So image i of a request equals image 0 of a request made with seed + i, which lets a
    user reproduce any single image of a batch.
    """
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def random_seed() -> int:
    import secrets

    return secrets.randbelow(2**31)


def seeded_generators(seeds: Sequence[int]) -> list[Any]:
    """One generator per image. On the CPU: the same seed gives the same initial noise on
    every device and in every batch (so image i of a request is the same alone or batched)."""
    import torch

    return [torch.Generator("cpu").manual_seed(s) for s in seeds]
