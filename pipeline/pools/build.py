"""Build a pool from a source: encode each image, write shards, write the index last."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from pipeline.pools.encode import ENCODINGS, encode_image
from pipeline.pools.format import IMAGE_EXTENSIONS, LABEL_EXTENSION, META_EXTENSION, PoolIndex
from pipeline.pools.sources.base import ImageSource, SourceSample
from pipeline.pools.writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, PoolWriter

__all__ = ["build_pool", "sample_files"]

_SAME = {"jpg": {"jpg", "jpeg"}, "png": {"png"}, "webp": {"webp"}}


def sample_files(sample: SourceSample, encoding: str | None = None, *, with_label: bool = True) -> dict[str, bytes]:
    """Turn a source sample into the files of a pool sample.

    Encoded images in a pool format pass through untouched unless another ``encoding`` is
    asked for (re-encoding JPEGs loses quality); arrays and other formats are encoded
    (PNG by default, lossless).

    Args:
        sample: The source sample.
        encoding: ``png``, ``jpg``, ``webp``, or ``None`` (keep, else PNG).
        with_label: Whether to store the label as ``cls``.

    Returns:
        Extension -> bytes (``png``/``jpg``/..., optional ``cls`` and ``json``).

    Raises:
        ValueError: On an unknown encoding.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if isinstance(sample.image, bytes):
        ext = (sample.image_ext or "").lower()
        keep = ext in IMAGE_EXTENSIONS and (encoding is None or ext in _SAME[encoding])
        if keep:
            files = {ext: sample.image}
        else:
            with Image.open(io.BytesIO(sample.image)) as img:
                img.load()
                target = encoding or "png"
                files = {target: encode_image(img, target)}
    else:
        target = encoding or "png"
        files = {target: encode_image(sample.image, target)}
    if with_label and sample.label is not None:
        files[LABEL_EXTENSION] = str(int(sample.label)).encode("ascii")
    if sample.meta is not None:
        files[META_EXTENSION] = json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()
    return files


def build_pool(
    source: ImageSource,
    out_uri: str,
    *,
    encoding: str | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    unlabeled: bool = False,
) -> PoolIndex:
    """Write every sample of ``source`` to a new pool at ``out_uri``.

    Args:
        source: Any :class:`~pipeline.pools.sources.ImageSource`.
        out_uri: New pool prefix (local or any fsspec URI).
        encoding: Image encoding (see :func:`sample_files`).
        shard_samples: Maximum samples per shard.
        shard_bytes: Target maximum bytes per shard.
        storage_options: fsspec options for ``out_uri``.
        class_names: Names replacing the source's class list (e.g. Fashion-MNIST's, which
            IDX files do not carry); must cover every label.
        unlabeled: Drop labels (a pool to be labeled by annotators); the class list is kept.

    Returns:
        The index written.

    Raises:
        ValueError: On a class list that does not cover the labels, or a bad sample.
        PoolExistsError: If ``out_uri`` already holds a pool.
        EmptyPoolError: If the source yields nothing.
    """
    classes = tuple(class_names) if class_names is not None else source.classes
    if class_names is not None and source.classes is not None and len(class_names) < len(source.classes):
        raise ValueError(f"{len(class_names)} class names given but the source has {len(source.classes)} classes")
    provenance = {**source.provenance(), "encoding": encoding, "unlabeled": unlabeled}
    with PoolWriter(
        out_uri,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        storage_options=storage_options,
        classes=classes,
        source=provenance,
    ) as writer:
        for sample in source:
            if sample.label is not None and classes is not None and not 0 <= sample.label < len(classes):
                raise ValueError(
                    f"sample {sample.key!r} has label {sample.label}, outside the class list ({len(classes)} classes)"
                )
            writer.write(sample.key, sample_files(sample, encoding, with_label=not unlabeled))
        return writer.close()
