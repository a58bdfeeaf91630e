"""IDX files: the MNIST / Fashion-MNIST format, gzip-compressed or raw.

A folder holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` (``-`` or ``.``
before ``idx`` both occur in the wild). IDX layout: two zero bytes, a type code, the
number of dimensions, each dimension as a big-endian int32, then the data, row-major.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

from pipeline.pools.sources.base import ArraySamples, SourceSample
from pipeline.storage import filesystem_for

__all__ = ["IdxSource", "parse_idx", "write_idx"]

# IDX type code -> numpy dtype (all big-endian on disk).
_IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse one IDX file's bytes (gzip is detected by its magic number).

    Args:
        data: File contents.
        where: Name for error messages.

    Returns:
        The array, native byte order, shape from the header.

    Raises:
        ValueError: On a bad magic number, unknown type code, or a size mismatch.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{where} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">i4"))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{where}: header says shape {dims} ({expected} bytes of data) but the file has "
            f"{len(data) - header}; the file is truncated or not IDX"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX bytes (the inverse of :func:`parse_idx`; used by tests).

    Args:
        array: Array of a dtype IDX supports (uint8, int8, int16, int32, float32, float64).

    Returns:
        Raw (uncompressed) IDX bytes.

    Raises:
        ValueError: If the dtype has no IDX type code.
    """
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array).astype(_IDX_TYPES[code]).tobytes()


class IdxSource:
    """Images and labels from an IDX folder (MNIST, Fashion-MNIST, KMNIST, ...).

    Keys are ``<split>_<index>`` with the index zero-padded to 6 digits: ``train_000017``.

    Args:
        folder: Folder URI (local or any fsspec storage).
        split: ``"train"`` or ``"test"`` (files ``train-*`` / ``t10k-*``).
        storage_options: fsspec options for ``folder``.

    Raises:
        FileNotFoundError: If the split's image or label file is missing.
        ValueError: On malformed files, or image and label counts that differ.
    """

    def __init__(self, folder: str, split: str = "train", storage_options: Mapping[str, Any] | None = None) -> None:
        if split not in _SPLIT_PREFIX:
            raise ValueError(f"IDX split must be 'train' or 'test', got {split!r}")
        self.folder = folder
        self.split = split
        fs, root = filesystem_for(folder, storage_options)
        images_path = _find(fs, root, _SPLIT_PREFIX[split], "images", "idx3", folder)
        labels_path = _find(fs, root, _SPLIT_PREFIX[split], "labels", "idx1", folder)
        self.images = parse_idx(fs.cat_file(images_path), images_path)
        self.labels = parse_idx(fs.cat_file(labels_path), labels_path).astype(np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"{images_path}: expected uint8 images [N, H, W] or [N, H, W, C], "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"{labels_path}: {self.labels.shape[0]} labels for {len(self.images)} images")
        if len(self.labels) and self.labels.min() < 0:
            raise ValueError(f"{labels_path}: negative labels")
        num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self._classes = tuple(str(c) for c in range(num_classes))
        self._files = (images_path, labels_path)

    @property
    def classes(self) -> tuple[str, ...]:
        """``("0", "1", ...)`` up to the largest label: IDX files carry no class names."""
        return self._classes

    def provenance(self) -> dict[str, Any]:
        """Source kind, folder, split and sample count."""
        return {"kind": "idx", "folder": self.folder, "split": self.split, "samples": len(self.images)}

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SourceSample]:
        for i, (image, label) in enumerate(zip(self.images, self.labels)):
            yield SourceSample(key=f"{self.split}_{i:06d}", image=image, label=int(label))

    def partition(self, start: int, stop: int) -> ArraySamples:
        """Samples ``start .. stop-1`` with their pixels (tasks need not reach the IDX files)."""
        return ArraySamples(
            keys=[f"{self.split}_{i:06d}" for i in range(start, stop)],
            images=np.ascontiguousarray(self.images[start:stop]),
            labels=np.ascontiguousarray(self.labels[start:stop]),
        )

    def fingerprint(self, start: int, stop: int) -> str:
        """Digest of the keys, pixels and labels of samples ``start .. stop-1``."""
        return self.partition(start, stop).digest()


def _find(fs: AbstractFileSystem, root: str, prefix: str, kind: str, idx: str, folder: str) -> str:
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.isdir(root) else []
    # train-images-idx3-ubyte, train-images.idx3-ubyte, each optionally .gz
    wanted = [f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"]
    for name in wanted:
        for candidate in (name, name + ".gz"):
            if candidate in names:
                return f"{root}/{candidate}"
    raise FileNotFoundError(
        f"no {wanted[0]}[.gz] in {folder} (found: {', '.join(names[:8]) or 'nothing'}); "
        "expected the MNIST/Fashion-MNIST file names"
    )
