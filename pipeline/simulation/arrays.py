"""A labeled pool decoded into memory, for simulations small enough to hold it (Fashion-MNIST's
60k 28x28 images are 188 MB as float32).

Simulating on arrays removes what dominates a simulated cycle on a small machine: starting a
training job and a query job per cycle, and decoding the pool again for each. The images are
decoded once with the same decoder (`pipeline.pools.decode_sample`) and the same normalisation
as the Ray jobs, so the models see identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.pools import DecodeError, DecodeSpec, decode_sample, iter_pool_samples, resolve_pool

__all__ = ["ArrayPool", "load_array_pool"]


@dataclass(frozen=True)
class ArrayPool:
    """Decoded samples of one pool.

    Attributes:
        keys: Sample keys [N], in pool order.
        images: float32 [N, C, H, W], normalised as the jobs normalise them.
        labels: int64 [N], the true class of each sample.
        classes: The pool's class names.
        skipped: (key, reason) of samples that could not be decoded (not in the arrays).
    """

    keys: list[str]
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]]

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.images) == len(self.labels)):
            raise ValueError(f"{len(self.keys)} keys, {len(self.images)} images and {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.keys)

    def index(self) -> dict[str, int]:
        """Key -> row."""
        return {key: i for i, key in enumerate(self.keys)}


def load_array_pool(uri: str, spec: DecodeSpec, storage_options: Mapping[str, Any] | None = None) -> ArrayPool:
    """Decode every sample of a fully labeled pool into memory.

    Args:
        uri: The pool (any fsspec storage).
        spec: Decode spec of the model (shape, normalisation, class count).
        storage_options: fsspec options.

    Returns:
        The :class:`ArrayPool`. Undecodable samples are listed in ``skipped``, never silently lost.

    Raises:
        ValueError: A sample without a label (a simulation needs the truth for every sample), or
            a pool in which nothing decoded.
    """
    pool = resolve_pool(uri, storage_options)
    keys, images, labels, skipped = [], [], [], []
    for sample in iter_pool_samples(pool):
        try:
            decoded = decode_sample(sample.files, spec)
        except DecodeError as error:
            skipped.append((sample.key, str(error)))
            continue
        if decoded.label < 0:
            raise ValueError(f"sample {sample.key} of {uri} has no label: simulation needs a fully labeled pool")
        keys.append(sample.key)
        images.append(decoded.image)
        labels.append(decoded.label)
    if not keys:
        raise ValueError(f"no sample of {uri} could be decoded ({len(skipped)} failed; first: {skipped[:1]})")
    classes = list(pool.classes) if pool.classes else [str(c) for c in range(max(labels) + 1)]
    return ArrayPool(keys, np.stack(images), np.asarray(labels, dtype=np.int64), classes, skipped)
