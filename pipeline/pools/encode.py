"""Encode source images for a pool, deterministically (fixed codec settings, no metadata)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["ENCODINGS", "encode_image"]

ENCODINGS = ("png", "jpg", "webp")
# Fixed settings: the same pixels always give the same bytes with a given Pillow build.
_SAVE_ARGS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 6},
    "jpg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 95, "method": 4},
}


def encode_image(image: np.ndarray | Image.Image, encoding: str = "png") -> bytes:
    """Encode an image as PNG, JPEG or WebP bytes.

    Args:
        image: ``uint8`` array ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB), or a PIL image.
        encoding: One of :data:`ENCODINGS`.

    Returns:
        The encoded bytes.

    Raises:
        ValueError: On an unknown encoding or an array that is not an 8-bit image.
    """
    if encoding not in _SAVE_ARGS:
        raise ValueError(f"unknown image encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
            raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    elif image.mode not in ("L", "RGB"):
        # JPEG cannot hold alpha or palettes; one rule for every encoding keeps pools uniform.
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, **_SAVE_ARGS[encoding])
    return buffer.getvalue()
