"""What a pool source yields, and the protocol every source implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["ImageSource", "SourceSample"]


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
