"""A deterministic, learnable synthetic image classification task (quickstart and tests).

Class ``c`` is a shape (``c % 5``: disc, square, triangle, bar, plus), drawn filled or as
an outline (``(c // 5) % 2``), in a class colour (``c // 10`` picks one of 8 hues; on one
channel, one of 8 brightness levels), at a random position and size on a noisy background. A
small CNN separates the classes well above chance after a few epochs, while position,
size, contrast and noise jitter keep the task from being trivial.

Each sample draws from its own generator seeded by ``(seed, split, index)``, so sample
``i`` is the same whatever ``n`` is, and the train and test splits never coincide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.pools.sources.base import SourceSample

__all__ = ["MAX_SYNTHETIC_CLASSES", "SHAPES", "SyntheticRange", "SyntheticSource", "synthetic"]

SHAPES = ("disc", "square", "triangle", "bar", "plus")
_STYLES = ("filled", "outline")
# Distinct hues (RGB); on one channel each maps to a brightness level.
_HUES = (
    (230, 60, 60),
    (60, 200, 70),
    (70, 110, 240),
    (240, 210, 50),
    (200, 70, 220),
    (60, 210, 220),
    (245, 140, 40),
    (235, 235, 235),
)
# One channel: a brightness level per hue index (brightness of the hue itself would collide).
_GRAYS = (210, 150, 250, 120, 180, 100, 235, 135)
MAX_SYNTHETIC_CLASSES = len(SHAPES) * len(_STYLES) * len(_HUES)
_SPLIT_CODE = {"train": 0, "test": 1}


def _draw(rng: np.random.Generator, label: int, size: int, channels: int) -> np.ndarray:
    shape = SHAPES[label % len(SHAPES)]
    style = _STYLES[(label // len(SHAPES)) % len(_STYLES)]
    hue_index = label // (len(SHAPES) * len(_STYLES))
    hue = np.array(_HUES[hue_index], dtype=np.float64)
    background = rng.uniform(20, 70)
    contrast = rng.uniform(0.75, 1.0)
    colour = tuple(int(v) for v in np.clip(hue * contrast, 0, 255))
    if channels == 1:
        colour = (int(_GRAYS[hue_index] * contrast),) * 3
    canvas = Image.new("RGB", (size, size), (int(background),) * 3)
    draw = ImageDraw.Draw(canvas)
    half = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
    box = (cx - half, cy - half, cx + half, cy + half)
    width = max(1, round(size / 14))
    fill, outline = (colour, None) if style == "filled" else (None, colour)
    if shape == "disc":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        points = [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    elif shape == "bar":
        draw.rectangle((cx - half, cy - half / 3, cx + half, cy + half / 3), fill=fill, outline=outline, width=width)
    else:  # plus
        arm = half / 3
        for rect in ((cx - half, cy - arm, cx + half, cy + arm), (cx - arm, cy - half, cx + arm, cy + half)):
            draw.rectangle(rect, fill=fill, outline=outline, width=width)
    pixels = np.asarray(canvas, dtype=np.float64)
    pixels = pixels + rng.normal(0.0, 12.0, size=pixels.shape)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image[:, :, 0] if channels == 1 else image


class SyntheticSource:
    """``n`` synthetic labeled images; see the module docstring for the task.

    Keys are ``synthetic_<split>_<index>``: ``synthetic_train_000017``.

    Args:
        n: Number of samples.
        seed: Seed of the task (same seed, same images and labels).
        num_classes: Between 2 and :data:`MAX_SYNTHETIC_CLASSES`.
        image_size: Height and width in pixels (>= 8).
        channels: 1 (grayscale) or 3 (RGB).
        split: ``"train"`` or ``"test"``: disjoint draws from the same task.

    Raises:
        ValueError: On out-of-range arguments.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        split: str = "train",
    ) -> None:
        problems = []
        if n <= 0:
            problems.append(f"n must be positive, got {n}")
        if not 2 <= num_classes <= MAX_SYNTHETIC_CLASSES:
            problems.append(f"num_classes must be in [2, {MAX_SYNTHETIC_CLASSES}], got {num_classes}")
        if image_size < 8:
            problems.append(f"image_size must be >= 8, got {image_size}")
        if channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {channels}")
        if split not in _SPLIT_CODE:
            problems.append(f"split must be 'train' or 'test', got {split!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.n, self.seed, self.num_classes = n, seed, num_classes
        self.image_size, self.channels, self.split = image_size, channels, split

    @property
    def classes(self) -> tuple[str, ...]:
        """Names like ``filled_disc_0`` (style, shape, hue index)."""
        return tuple(
            f"{_STYLES[(c // len(SHAPES)) % len(_STYLES)]}_{SHAPES[c % len(SHAPES)]}_"
            f"{c // (len(SHAPES) * len(_STYLES))}"
            for c in range(self.num_classes)
        )

    def provenance(self) -> dict[str, Any]:
        """Every generator parameter: enough to rebuild the same pool."""
        return {
            "kind": "synthetic",
            "n": self.n,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "channels": self.channels,
            "split": self.split,
        }

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> SourceSample:
        """Return sample ``index`` (independent of ``n``)."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        label = int(rng.integers(self.num_classes))
        image = _draw(rng, label, self.image_size, self.channels)
        return SourceSample(key=f"synthetic_{self.split}_{index:06d}", image=image, label=label)

    def __iter__(self) -> Iterator[SourceSample]:
        for i in range(self.n):
            yield self.sample(i)

    def partition(self, start: int, stop: int) -> SyntheticRange:
        """Samples ``start .. stop-1``: drawn where they are written, from their own seeds."""
        return SyntheticRange(self, start, stop)

    def fingerprint(self, start: int, stop: int) -> str:
        """Digest of the generator parameters and the range (sample ``i`` depends on nothing else)."""
        params = {k: v for k, v in self.provenance().items() if k != "n"}
        return hashlib.sha256(json.dumps([params, start, stop], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class SyntheticRange:
    """Samples ``start .. stop-1`` of a :class:`SyntheticSource`; a few bytes to pickle."""

    source: SyntheticSource
    start: int
    stop: int

    @property
    def classes(self) -> tuple[str, ...]:
        """The whole source's class names."""
        return self.source.classes

    def provenance(self) -> dict[str, Any]:
        """The whole source's provenance."""
        return self.source.provenance()

    def __iter__(self) -> Iterator[SourceSample]:
        for i in range(self.start, self.stop):
            yield self.source.sample(i)


def synthetic(
    n: int,
    seed: int = 0,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    split: str = "train",
) -> SyntheticSource:
    """Build a :class:`SyntheticSource` (the ``--synthetic N`` source).

    Args:
        n: Number of samples.
        seed: Task seed.
        num_classes: Number of classes.
        image_size: Height and width.
        channels: 1 or 3.
        split: ``"train"`` or ``"test"``.

    Returns:
        The source.
    """
    return SyntheticSource(n, seed, num_classes, image_size, channels, split)
