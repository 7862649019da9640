"""Procedural dataset: one colored shape on a plain white background, with its caption.

Everything is drawn with PIL from a seeded `random.Random`, so a (seed, index) pair always
gives the same image and caption on every machine. Shapes are drawn 4x larger and
downsampled, so edges are anti-aliased like the blurry edges a diffusion model produces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Well separated in RGB (and hue), so a slightly off-color generation still maps to its name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "black": (25, 25, 25),
}
# Colors the base model never saw: the demo LoRA (examples/demo/train_lora.py) teaches them.
# `sample()` / `all_captions()` draw from COLORS only, so the base data set is unchanged;
# rendering, prompt parsing and the checker know the whole PALETTE. A deep orange: the demo VAE
# (trained on the six colors) decodes it as about (231, 123, 8), still far from red and yellow.
LORA_COLORS: dict[str, tuple[int, int, int]] = {"orange": (230, 90, 0)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, **LORA_COLORS}
POSITIONS: tuple[str, ...] = ("left", "center", "right")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
DEFAULT_SIZE = 32
# Horizontal centre of each position as a fraction of the width; shapes sit on the middle row.
_POS_X: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Sample:
    """One training example: the picture and what it shows."""

    image: Image.Image
    caption: str
    shape: str
    color: str
    position: str


def caption(shape: str, color: str, position: str | None) -> str:
    """The caption for a shape; without a position it is e.g. "a red circle"."""
    article = "an" if color[0] in "aeiou" else "a"  # "an orange circle"
    if position is None:
        return f"{article} {color} {shape}"
    where = "in the center" if position == "center" else f"on the {position}"
    return f"{article} {color} {shape} {where}"


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """(shape, color, position) named in a prompt, None for each part that is not named."""
    words = text.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in PALETTE), None)
    pos = next((w for w in words if w in POSITIONS or w == "middle"), None)
    return shape, color, ("center" if pos == "middle" else pos)


def all_captions(with_position_free: bool = True) -> list[str]:
    """Every caption the model is trained on, in a fixed order."""
    out = [caption(s, c, p) for s in SHAPES for c in COLORS for p in POSITIONS]
    if with_position_free:
        out += [caption(s, c, None) for s in SHAPES for c in COLORS]
    return out


def render(
    shape: str,
    color: str,
    position: str,
    size: int = DEFAULT_SIZE,
    radius: float | None = None,
    dx: float = 0.0,
    dy: float = 0.0,
) -> Image.Image:
    """Draw one shape; `radius` is half its width in pixels, dx/dy shift its centre."""
    s = _SUPERSAMPLE
    radius = size * 0.19 if radius is None else radius
    cx = (size * _POS_X[position] + dx) * s
    cy = (size * 0.5 + dy) * s
    r = radius * s
    big = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(big)
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        # A slightly smaller half-width keeps the square's area near the circle's.
        h = r * 0.9
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        # Upright isosceles triangle whose bounding box is the circle's box.
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return big.resize((size, size), Image.Resampling.BOX)


def sample(rng: random.Random, size: int = DEFAULT_SIZE, p_no_position: float = 0.0) -> Sample:
    """Draw one random sample; with probability `p_no_position` the caption omits where."""
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    position = rng.choice(POSITIONS)
    # Small size and placement jitter: enough variety to generalise, never leaving the third.
    radius = size * rng.uniform(0.16, 0.22)
    dx = size * rng.uniform(-0.04, 0.04)
    dy = size * rng.uniform(-0.08, 0.08)
    image = render(shape, color, position, size, radius, dx, dy)
    named = None if rng.random() < p_no_position else position
    return Sample(image, caption(shape, color, named), shape, color, position)


def generate(
    n: int, seed: int = 0, size: int = DEFAULT_SIZE, p_no_position: float = 0.0
) -> list[Sample]:
    """`n` samples, identical for identical arguments."""
    rng = random.Random(seed)
    return [sample(rng, size, p_no_position) for _ in range(n)]
