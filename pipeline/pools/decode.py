"""Decode pool samples into model inputs; a sample that fails becomes an error row.

Only three kinds of payload are ever interpreted:

- images with extension ``jpg``/``jpeg``/``png``/``webp``, opened by Pillow restricted to
  the JPEG, PNG and WebP decoders (no other Pillow plugin, e.g. EPS, can be reached);
- ``cls`` as an ASCII integer;
- ``json`` with ``json.loads``.

Every other member (``.pickle``, ``.pth``, ``.npy``, ...) is ignored: pool bytes are never
unpickled or ``torch.load``-ed. Transforms follow torchvision's eval recipe: resize the
shorter side, center-crop, scale to [0, 1], normalise per channel, ``[C, H, W]`` float32.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.pools.format import IMAGE_EXTENSIONS, LABEL_EXTENSION, META_EXTENSION

__all__ = [
    "DecodeError",
    "DecodeSpec",
    "DecodedSample",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_COLUMNS",
    "decode_batch",
    "decode_image",
    "decode_sample",
    "spec_for_model",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Columns of a decoded batch (see decode_batch).
OUTPUT_COLUMNS = ("key", "shard", "image", "label", "error", "meta")
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")


class DecodeError(ValueError):
    """A sample could not be turned into a model input; the message is the error-row reason."""


@dataclass(frozen=True)
class DecodeSpec:
    """How to turn an image into a model input.

    Attributes:
        channels: 1 (grayscale; RGB is converted by luminance) or 3 (RGB; grayscale is repeated).
        height: Output height.
        width: Output width.
        resize: Shorter side after resizing, before the center crop. ``None``: ``max(height,
            width)``, i.e. scale so the crop just fits (e.g. 256 then crop 224 for ImageNet).
        mean: Per-channel mean subtracted after scaling to [0, 1] (length 1 or ``channels``).
        std: Per-channel std divided by (length 1 or ``channels``).
        max_pixels: Larger images are error rows (decompression bombs).
        num_classes: When set, labels outside ``[0, num_classes)`` are error rows.

    Raises:
        ValueError: On inconsistent values (checked at construction).
    """

    channels: int = 3
    height: int = 32
    width: int = 32
    resize: int | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    max_pixels: int = 64_000_000
    num_classes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.height <= 0 or self.width <= 0:
            problems.append(f"height and width must be positive, got {self.height}x{self.width}")
        if self.resize is not None and self.resize < max(self.height, self.width):
            problems.append(f"resize={self.resize} is smaller than the crop {self.height}x{self.width}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                problems.append(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive, got {self.std}")
        if self.num_classes is not None and self.num_classes <= 0:
            problems.append(f"num_classes must be positive, got {self.num_classes}")
        if problems:
            raise ValueError("invalid DecodeSpec: " + "; ".join(problems))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one decoded image."""
        return (self.channels, self.height, self.width)


def spec_for_model(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DecodeSpec:
    """Build the :class:`DecodeSpec` for a registered model's input.

    Args:
        name: Registered model name (``pipeline.models.available_models()``).
        in_channels: Channels the model was built with; default from its input spec.
        num_classes: Classes of the task (labels outside become error rows).
        resize: Shorter side before the crop (default: the crop size).
        mean: Normalisation mean; default 0.5 per channel.
        std: Normalisation std; default 0.5 per channel.

    Returns:
        The spec, with ``(C, H, W)`` from :func:`pipeline.models.input_spec`.

    Raises:
        ValueError: If the model is unknown.
    """
    from pipeline.models import input_spec  # models pull in torch; keep decoding importable without it

    channels, height, width = input_spec(name)
    channels = in_channels or channels
    return DecodeSpec(
        channels=channels,
        height=height,
        width=width,
        resize=resize,
        mean=tuple(mean) if mean is not None else (0.5,) * channels,
        std=tuple(std) if std is not None else (0.5,) * channels,
        num_classes=num_classes,
    )


def decode_image(data: bytes, spec: DecodeSpec) -> np.ndarray:
    """Decode image bytes into a normalised ``[C, H, W]`` float32 array.

    Args:
        data: JPEG, PNG or WebP bytes.
        spec: Target shape and normalisation.

    Returns:
        ``float32`` array of shape ``spec.shape``.

    Raises:
        DecodeError: If the bytes are not a JPEG/PNG/WebP image, are too large, or are corrupt.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
            width, height = img.size
            if width * height > spec.max_pixels:
                raise DecodeError(f"image is {width}x{height}, over max_pixels={spec.max_pixels}")
            short = spec.resize or max(spec.height, spec.width)
            scale = short / min(width, height)
            mode = "L" if spec.channels == 1 else "RGB"
            if scale < 1 and img.format == "JPEG":
                # Let libjpeg decode at a reduced scale (no smaller than the resize target).
                img.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))
            img = _to_mode(img, mode)
            if min(img.size) != short:
                ratio = short / min(img.size)
                size = (max(short, round(img.size[0] * ratio)), max(short, round(img.size[1] * ratio)))
                img = img.resize(size, Image.Resampling.BILINEAR)
            left = (img.size[0] - spec.width) // 2
            top = (img.size[1] - spec.height) // 2
            img = img.crop((left, top, left + spec.width, top + spec.height))
            pixels = np.asarray(img, dtype=np.float32)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not a JPEG, PNG or WebP image") from None
    except Exception as err:  # noqa: BLE001  (any decoder failure on untrusted bytes is a row error)
        raise DecodeError(f"not a decodable image: {type(err).__name__}: {err}") from None
    pixels = pixels.reshape(spec.height, spec.width, spec.channels) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit grayscale PNG: Pillow's L conversion clips, so rescale 0..65535 -> 0..255.
        wide = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black rather than keep hidden colours under transparent pixels.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == mode else img.convert(mode)


@dataclass(frozen=True)
class DecodedSample:
    """A decoded sample.

    Attributes:
        image: ``float32`` ``[C, H, W]``.
        label: Class index, ``-1`` when the sample has no ``cls``.
        meta: The validated JSON metadata text, or ``None``.
    """

    image: np.ndarray
    label: int
    meta: str | None


def _present(value: Any) -> bool:
    # Ray Data fills a column a sample lacks with None (or NaN through pandas).
    return isinstance(value, (bytes, bytearray, memoryview))


def decode_sample(files: Mapping[str, Any], spec: DecodeSpec) -> DecodedSample:
    """Decode one sample's files (extension -> bytes; absent files may be ``None``).

    Args:
        files: The sample's members by extension (other keys such as ``__key__`` are ignored).
        spec: Target shape, normalisation and class count.

    Returns:
        The decoded sample.

    Raises:
        DecodeError: No image or several, undecodable image, bad ``cls`` or ``json``, or a
            label outside ``[0, spec.num_classes)``.
    """
    present = {k.lower(): bytes(v) for k, v in files.items() if not k.startswith("__") and _present(v)}
    images = [ext for ext in IMAGE_EXTENSIONS if ext in present]
    if not images:
        found = ", ".join(sorted(present)) or "nothing"
        raise DecodeError(f"no image file (jpg, jpeg, png or webp); the sample has: {found}")
    if len(images) > 1:
        raise DecodeError(f"several image files ({', '.join(images)}); a sample holds one image")
    image = decode_image(present[images[0]], spec)
    label = -1
    if LABEL_EXTENSION in present:
        text = present[LABEL_EXTENSION].strip()
        if not text.isdigit() or not text.isascii():
            raise DecodeError(f"cls is not a non-negative ASCII integer: {text[:20]!r}")
        label = int(text)
        if spec.num_classes is not None and label >= spec.num_classes:
            raise DecodeError(f"label {label} is outside the class list ({spec.num_classes} classes)")
    meta = None
    if META_EXTENSION in present:
        try:
            json.loads(present[META_EXTENSION])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DecodeError(f"json metadata is not valid JSON: {err}") from None
        meta = present[META_EXTENSION].decode("utf-8")
    return DecodedSample(image=image, label=label, meta=meta)


def decode_batch(
    batch: Mapping[str, Sequence[Any]],
    spec: DecodeSpec,
    *,
    shard_prefix: str = "",
    on_error: Literal["row", "raise"] = "row",
) -> dict[str, np.ndarray]:
    """Decode a batch of raw samples (columns as Ray Data's ``read_webdataset`` gives them).

    Args:
        batch: Columns ``__key__``, ``__url__`` and one per member extension (bytes or
            ``None``). A batch may also carry ``error`` (a shard-level failure from the reader).
        spec: Target shape, normalisation and class count.
        shard_prefix: Prepended to ``__url__`` to give the shard URI (``"s3://"`` when the
            reader saw protocol-stripped paths).
        on_error: ``"row"``: a failing sample becomes an error row; ``"raise"``: re-raise.

    Returns:
        Columns ``key`` (str; the raw read's ``__key__`` under the name every later stage, the
        scores table and the manifest use), ``shard`` (str), ``image`` (float32 ``[B, C, H, W]``,
        zeros on error rows), ``label`` (int64, -1 when absent or on error), ``error``
        (``None`` or the reason), ``meta`` (JSON text or ``None``).

    Raises:
        DecodeError: Only with ``on_error="raise"``.
    """
    keys = list(batch["__key__"])
    n = len(keys)
    urls = list(batch.get("__url__", [None] * n))
    upstream = list(batch.get("error", [None] * n))
    columns = [c for c in batch if c not in ("__key__", "__url__", "error")]
    images = np.zeros((n, *spec.shape), dtype=np.float32)
    labels = np.full(n, -1, dtype=np.int64)
    errors: list[str | None] = [None] * n
    metas: list[str | None] = [None] * n
    for i in range(n):
        if isinstance(upstream[i], str):
            errors[i] = upstream[i]
            continue
        try:
            sample = decode_sample({c: batch[c][i] for c in columns}, spec)
        except DecodeError as err:
            if on_error == "raise":
                raise DecodeError(f"sample {keys[i]!r} in {shard_prefix}{urls[i]}: {err}") from None
            errors[i] = str(err)
            continue
        images[i], labels[i], metas[i] = sample.image, sample.label, sample.meta
    return {
        "key": np.asarray([str(k) if k is not None else None for k in keys], dtype=object),
        "shard": np.asarray([f"{shard_prefix}{u}" if u is not None else None for u in urls], dtype=object),
        "image": images,
        "label": labels,
        "error": np.asarray(errors, dtype=object),
        "meta": np.asarray(metas, dtype=object),
    }
