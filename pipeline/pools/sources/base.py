"""What a pool source yields, and the protocol every source implements."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ArraySamples", "ImageSource", "PartitionedSource", "SourceSample"]


@dataclass(frozen=True)
class SourceSample:
    """One sample from a source, before encoding.

    Attributes:
        key: The pool key (deterministic: the same input always gives the same key).
        image: ``uint8`` array ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB), or the bytes
            of an already-encoded image.
        image_ext: For encoded bytes, their extension (``png``, ``jpg``, ``jpeg``, ``webp``);
            ``None`` for arrays.
        label: Class index into the source's ``classes``, or ``None``.
        meta: Optional JSON-serialisable metadata stored as ``<key>.json``.
    """

    key: str
    image: np.ndarray | bytes
    image_ext: str | None = None
    label: int | None = None
    meta: dict[str, Any] | None = field(default=None)


class ImageSource(Protocol):
    """A finite, deterministic stream of :class:`SourceSample` with an optional class list."""

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names (``label`` indexes them), ``None`` for unlabeled sources."""
        ...

    def provenance(self) -> dict[str, Any]:
        """JSON description of the source recorded in the pool index."""
        ...

    def __iter__(self) -> Iterator[SourceSample]: ...


@runtime_checkable
class PartitionedSource(ImageSource, Protocol):
    """A source that can hand out contiguous ranges of its samples, for a parallel build.

    ``partition(start, stop)`` must be cheap to make and to pickle (it travels to a Ray task),
    and iterate exactly the samples ``start .. stop-1`` of ``iter(source)``. ``fingerprint``
    identifies those samples without decoding them (file sizes and versions, array bytes,
    generator parameters), so a resumed build can tell a finished partition from a changed one.
    """

    def __len__(self) -> int: ...

    def partition(self, start: int, stop: int) -> ImageSource:
        """The samples ``start .. stop-1``, as a small picklable source."""
        ...

    def fingerprint(self, start: int, stop: int) -> str:
        """A hex digest that changes when any sample in ``start .. stop-1`` changes."""
        ...


@dataclass(frozen=True)
class ArraySamples:
    """A picklable run of in-memory samples (a partition of an IDX or CIFAR source).

    Attributes:
        keys: One key per sample.
        images: ``uint8`` ``[N, H, W]`` or ``[N, H, W, 3]``.
        labels: ``[N]`` class indices, or ``None``.
        metas: One metadata dict (or ``None``) per sample, or ``None`` for none at all.
    """

    keys: Sequence[str]
    images: np.ndarray
    labels: np.ndarray | None = None
    metas: Sequence[dict[str, Any] | None] | None = None

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Unknown here: the partition's build takes the class list from its whole source."""
        return None

    def provenance(self) -> dict[str, Any]:
        """A partition has no provenance of its own."""
        return {"kind": "array_samples", "samples": len(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[SourceSample]:
        for i, key in enumerate(self.keys):
            yield SourceSample(
                key=key,
                image=np.ascontiguousarray(self.images[i]),
                label=int(self.labels[i]) if self.labels is not None else None,
                meta=self.metas[i] if self.metas is not None else None,
            )

    def digest(self) -> str:
        """Fingerprint of keys, pixels, labels and metadata."""
        h = hashlib.sha256()
        h.update("\n".join(self.keys).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        if self.metas is not None:
            h.update(json.dumps(list(self.metas), sort_keys=True).encode())
        return h.hexdigest()
