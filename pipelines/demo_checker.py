"""Decide from pixels alone which shape, color and position an image shows.

No neural network: the foreground is whatever differs clearly from the (white) background;
its largest connected blob is matched against a circle, a square and an upright triangle
fitted to the blob's bounding box (best intersection-over-union wins), its median color is
mapped to the nearest named color, and its centroid picks left / center / right.
This is robust to the blur and small color shifts of generated images, and it says "nothing"
(None) unless the image looks like a drawing of the task: one blob of a shape's size (not a
speck, not a full-frame fill), close to one of the three shapes (the winning IoU is its
score), on an otherwise clean background. That is how noise and fills from a broken model get
rejected: uniform noise is one frame-sized blob, a solid fill too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.demo_shapes import BACKGROUND, PALETTE, POSITIONS, SHAPES, parse_caption

# RGB distance from the background above which a pixel counts as foreground. Half the
# distance of the lightest palette color (yellow) so anti-aliased edges split evenly.
_FG_THRESHOLD = 60.0
# A blob smaller than this fraction of the image is not a drawing (noise, specks).
_MIN_AREA_FRACTION = 0.02
# Bounds on the blob's bounding-box sides, as fractions of the image side. Drawn shapes span
# 0.28-0.44 of the side (shapes.sample: radius 0.16-0.22), generated ones measured 0.25-0.44;
# a blob spanning most of the frame is a fill or noise, not a shape in one third of it.
_MIN_SIDE_FRACTION = 0.15
_MAX_SIDE_FRACTION = 0.6
# The winning template's IoU must reach this: procedural shapes score >= 0.79, the shipped
# model's images >= 0.66 (seeds 0-3 of the quality prompts); ragged blobs score far lower.
_MIN_SHAPE_SCORE = 0.5
# Foreground outside the blob, as a fraction of the image: a drawing has a clean background
# (0 in every procedural and generated image measured); more means clutter or noise.
_MAX_STRAY_FRACTION = 0.02


@dataclass(frozen=True)
class Verdict:
    """What the checker saw; `score` is the winning shape's IoU (how clean the shape is)."""

    shape: str
    color: str
    position: str
    score: float


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (images are tiny: plain BFS)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _templates(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ideal masks of each shape inscribed in the box [x0, x1] x [y0, y1] (inclusive)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ys += 0.5
    xs += 0.5
    left, right, top, bottom = float(x0), float(x1 + 1), float(y0), float(y1 + 1)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    rx, ry = max((right - left) / 2, 0.5), max((bottom - top) / 2, 0.5)
    inside = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
    circle = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    # Upright triangle: apex at the top centre, base along the bottom edge.
    frac = (ys - top) / (bottom - top)
    triangle = inside & (np.abs(xs - cx) <= frac * rx)
    return {"circle": circle, "square": inside, "triangle": triangle}


def classify(image: Image.Image | np.ndarray) -> Verdict | None:
    """The shape, color and position an image shows, or None when it shows no clear shape."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    arr = arr.astype(np.float64)
    h, w = arr.shape[:2]
    dist = np.linalg.norm(arr - np.asarray(BACKGROUND, dtype=np.float64), axis=-1)
    blob = _largest_component(dist > _FG_THRESHOLD)
    if blob.sum() < _MIN_AREA_FRACTION * h * w:
        return None
    # Re-segment at half the blob's own contrast: a blurred edge crosses 50% where the sharp
    # edge was, whereas a fixed threshold swells light colors and rounds every corner.
    contrast = float(np.percentile(dist[blob], 75))
    foreground = dist > max(_FG_THRESHOLD, 0.5 * contrast)
    blob = _largest_component(foreground)
    if blob.sum() < _MIN_AREA_FRACTION * h * w:
        return None
    if (foreground & ~blob).sum() > _MAX_STRAY_FRACTION * h * w:
        return None
    ys, xs = np.nonzero(blob)
    sides = ((ys.max() - ys.min() + 1) / h, (xs.max() - xs.min() + 1) / w)
    if not all(_MIN_SIDE_FRACTION <= side <= _MAX_SIDE_FRACTION for side in sides):
        return None
    boxes = _templates(int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()), (h, w))
    ious = {name: float((blob & m).sum() / max((blob | m).sum(), 1)) for name, m in boxes.items()}
    shape = max(SHAPES, key=lambda s: ious[s])
    if ious[shape] < _MIN_SHAPE_SCORE:
        return None
    # Color from the blob's core (the most saturated half), so blurred edges mixing with the
    # white background do not pull it towards lighter colors.
    core = dist[blob] >= np.median(dist[blob])
    rgb = np.median(arr[blob][core], axis=0)
    color = min(PALETTE, key=lambda c: float(np.linalg.norm(rgb - np.asarray(PALETTE[c]))))
    third = float(xs.mean() + 0.5) / w
    position = POSITIONS[min(int(third * 3), 2)]
    return Verdict(shape, color, position, ious[shape])


def adheres(image: Image.Image | np.ndarray, prompt: str) -> bool:
    """True when the image shows every attribute (shape, color, position) the prompt names."""
    verdict = classify(image)
    if verdict is None:
        return False
    shape, color, position = parse_caption(prompt)
    return (
        (shape is None or verdict.shape == shape)
        and (color is None or verdict.color == color)
        and (position is None or verdict.position == position)
    )
