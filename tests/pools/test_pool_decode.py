"""Decoding: formats, channel handling, resize/crop/normalise, and error rows for bad payloads."""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.pools import DecodeError, DecodeSpec, decode_batch, decode_image, decode_sample, spec_for_model

UNIT = dict(mean=(0.0,), std=(1.0,))  # outputs in [0, 1]


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_rgb_and_grayscale_either_way(fmt: str) -> None:
    lossless = {"WEBP": {"lossless": True}}.get(fmt, {})
    colour = (200, 100, 50)
    rgb = _encode(Image.new("RGB", (16, 16), colour), fmt, **lossless)
    gray = _encode(Image.new("L", (16, 16), 120), fmt, **lossless)
    tol = 3 / 255 if fmt == "JPEG" else 1e-6
    out = decode_image(rgb, DecodeSpec(3, 16, 16, **UNIT))
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert np.allclose(out.mean(axis=(1, 2)), np.array(colour) / 255, atol=tol)
    luma = decode_image(rgb, DecodeSpec(1, 16, 16, **UNIT))  # ITU-R 601 luminance, as PIL's "L"
    assert luma.shape == (1, 16, 16)
    assert abs(luma.mean() - (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255) < tol + 1 / 255
    repeated = decode_image(gray, DecodeSpec(3, 16, 16, **UNIT))
    assert repeated.shape == (3, 16, 16) and np.allclose(repeated, 120 / 255, atol=tol)


def test_resize_shorter_side_then_center_crop() -> None:
    # 60x20 image: red | green | blue thirds. Shorter side 20 -> 10 gives 30x10; the 10x10 center is green.
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)
    stripes[:, :20, 0] = stripes[:, 20:40, 1] = stripes[:, 40:, 2] = 255
    out = decode_image(_encode(Image.fromarray(stripes), "PNG"), DecodeSpec(3, 10, 10, **UNIT))
    assert out.shape == (3, 10, 10)
    assert out[1, :, 2:8].min() > 0.9 and out[0, :, 2:8].max() < 0.1 and out[2, :, 2:8].max() < 0.1
    # resize larger than the crop: 256 -> crop 224 keeps the central 87.5%
    big = decode_image(_encode(Image.new("RGB", (300, 400)), "PNG"), DecodeSpec(3, 224, 224, resize=256))
    assert big.shape == (3, 224, 224)
    # upscaling a small image to the target works too
    assert decode_image(_encode(Image.new("L", (8, 8)), "PNG"), DecodeSpec(1, 28, 28)).shape == (1, 28, 28)


def test_normalisation_per_channel() -> None:
    data = _encode(Image.new("RGB", (4, 4), (255, 0, 51)), "PNG")
    out = decode_image(data, DecodeSpec(3, 4, 4, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1)))
    assert np.allclose(out[:, 0, 0], [(1 - 0.5) / 0.5, (0 - 0.5) / 0.25, (0.2 - 0.2) / 0.1], atol=1e-6)


def test_sixteen_bit_and_alpha_images() -> None:
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.allclose(decode_image(_encode(wide, "PNG"), DecodeSpec(1, 4, 4, **UNIT)), 1.0)
    transparent = Image.new("RGBA", (4, 4), (255, 255, 255, 0))  # white but fully transparent
    assert np.allclose(decode_image(_encode(transparent, "PNG"), DecodeSpec(3, 4, 4, **UNIT)), 0.0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"definitely not an image", "not a JPEG, PNG or WebP image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a"),
        (None, "not a JPEG, PNG or WebP image"),  # a GIF in a .png slot: decoders are restricted
    ],
)
def test_payloads_that_are_not_images(payload: bytes | None, reason: str) -> None:
    if payload is None:
        payload = _encode(Image.new("L", (4, 4)), "GIF")
    with pytest.raises(DecodeError, match=reason):
        decode_image(payload, DecodeSpec(1, 4, 4))


def test_truncated_image_and_oversized_image() -> None:
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(DecodeError, match="not a decodable image"):
        decode_image(data[: len(data) // 2], DecodeSpec(3, 8, 8))
    with pytest.raises(DecodeError, match="max_pixels"):
        decode_image(data, DecodeSpec(3, 8, 8, max_pixels=64 * 63))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_and_torch_members_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Exploit(marker))
    image = _encode(Image.new("L", (4, 4), 9), "PNG")
    sample = decode_sample({"png": image, "pickle": evil, "pth": evil, "pkl": evil}, DecodeSpec(1, 4, 4))
    assert sample.label == -1 and not marker.exists()
    with pytest.raises(DecodeError, match="no image file"):
        decode_sample({"pickle": evil}, DecodeSpec(1, 4, 4))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"cls": b"abc"}, "cls is not a non-negative ASCII integer"),
        ({"cls": b"-1"}, "cls is not a non-negative ASCII integer"),
        ({"cls": b"12"}, "outside the class list"),
        ({"json": b"{broken"}, "not valid JSON"),
        ({"jpg": b"x"}, "several image files"),
    ],
)
def test_sample_level_errors(files: dict, reason: str) -> None:
    png = _encode(Image.new("L", (4, 4)), "PNG")
    with pytest.raises(DecodeError, match=reason):
        decode_sample({"png": png, **files}, DecodeSpec(1, 4, 4, num_classes=10))


def test_decode_batch_turns_failures_into_error_rows() -> None:
    png = _encode(Image.new("L", (4, 4), 255), "PNG")
    batch = {
        "__key__": np.array(["good", "bad", "nolabel", "upstream"], dtype=object),
        "__url__": np.array(["b/p/a.tar"] * 4, dtype=object),
        "png": np.array([png, b"garbage", png, None], dtype=object),
        "cls": np.array([b"3", b"1", math.nan, None], dtype=object),  # NaN: Ray/pandas for "absent"
        "json": np.array([b'{"a": 1}', None, None, None], dtype=object),
        "error": np.array([None, None, None, "shard unreadable"], dtype=object),
    }
    out = decode_batch(batch, DecodeSpec(1, 4, 4, **UNIT), shard_prefix="s3://")
    assert list(out["key"]) == ["good", "bad", "nolabel", "upstream"]
    assert list(out["shard"]) == ["s3://b/p/a.tar"] * 4
    assert out["image"].shape == (4, 1, 4, 4) and np.allclose(out["image"][0], 1.0)
    assert np.all(out["image"][1] == 0)
    assert list(out["label"]) == [3, -1, -1, -1]
    assert out["error"][0] is None and out["error"][2] is None
    assert "not a JPEG, PNG or WebP image" in out["error"][1] and out["error"][3] == "shard unreadable"
    assert out["meta"][0] == '{"a": 1}'
    with pytest.raises(DecodeError, match="'bad' in s3://b/p/a.tar"):
        decode_batch(batch, DecodeSpec(1, 4, 4), shard_prefix="s3://", on_error="raise")


def test_spec_for_model_and_validation() -> None:
    assert spec_for_model("small_cnn").shape == (1, 28, 28)
    spec = spec_for_model("cifar_resnet18", num_classes=10)
    assert spec.shape == (3, 32, 32) and spec.num_classes == 10 and spec.mean == (0.5,) * 3
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DecodeSpec(channels=2)
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        DecodeSpec(mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="smaller than the crop"):
        DecodeSpec(height=32, width=32, resize=16)
