"""Summary statistics of acquisition values in bounded memory, for the run manifest.

Count, min, max, mean and standard deviation are exact and streamed (Chan et al.'s parallel
update, so per-actor summaries merge). Quantiles come from a bottom-k sample: each row gets a
uniform number from a hash of its key (:mod:`pipeline._keyhash`) and the ``capacity`` rows with
the smallest numbers are kept. That is a uniform random sample of the scored rows which, unlike a
reservoir, does not depend on the order rows arrive in or on how they were split, so the manifest
is reproducible and summaries merge exactly. With at most ``capacity`` scored rows the quantiles
are exact; beyond, a quantile's rank error is about ``1/sqrt(capacity)`` (0.4% at 65,536).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline._keyhash import key_uniforms

__all__ = ["DEFAULT_QUANTILES", "ScoreSummary"]

DEFAULT_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_SAMPLE_SEED = 0


class ScoreSummary:
    """Streaming summary of finite acquisition values.

    Args:
        capacity: Size of the key-hash sample behind the quantiles (> 0).
        quantiles: Quantile levels in [0, 1] reported by :meth:`to_dict`.
    """

    def __init__(self, capacity: int = 65_536, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantile levels must lie in [0, 1], got {list(quantiles)}")
        self.capacity = capacity
        self.quantiles = tuple(float(q) for q in quantiles)
        self.count = 0
        self.non_finite = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean
        self._sample_u = np.empty(0)
        self._sample_v = np.empty(0)

    def add(self, values: np.ndarray, keys: Sequence[str]) -> None:
        """Add a batch: values [N] with their keys [N]; NaN/inf values are only counted.

        Raises:
            ValueError: If the lengths differ.
        """
        values = np.asarray(values, dtype=np.float64)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        finite = np.isfinite(values)
        self.non_finite += int(len(values) - finite.sum())
        kept = values[finite]
        if len(kept) == 0:
            return
        batch = ScoreSummary(self.capacity, self.quantiles)
        batch.count = len(kept)
        batch.min, batch.max, batch.mean = float(kept.min()), float(kept.max()), float(kept.mean())
        batch._m2 = float(((kept - batch.mean) ** 2).sum())
        keys_kept = [keys[i] for i in np.flatnonzero(finite)]
        batch._sample_u = key_uniforms(keys_kept, _SAMPLE_SEED, "lplgrad.sample")
        batch._sample_v = kept
        batch._trim()
        self._merge_stats(batch)

    def merge(self, other: ScoreSummary) -> None:
        """Fold in another summary (e.g. one per actor); the result is as if one saw every row.

        Raises:
            ValueError: If the capacities differ (the samples would not combine exactly).
        """
        if other.capacity != self.capacity:
            raise ValueError(f"cannot merge summaries of capacity {self.capacity} and {other.capacity}")
        self.non_finite += other.non_finite
        self._merge_stats(other)

    def _merge_stats(self, other: ScoreSummary) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self._m2 += other._m2 + delta * delta * self.count * other.count / total
        self.mean += delta * other.count / total
        self.count = total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._sample_u = np.concatenate([self._sample_u, other._sample_u])
        self._sample_v = np.concatenate([self._sample_v, other._sample_v])
        self._trim()

    def _trim(self) -> None:
        # Keep the rows with the smallest key hashes: a uniform sample, order-independent.
        if len(self._sample_u) > self.capacity:
            keep = np.argpartition(self._sample_u, self.capacity - 1)[: self.capacity]
            self._sample_u, self._sample_v = self._sample_u[keep], self._sample_v[keep]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; statistics are ``None`` when no finite value was seen."""
        empty = self.count == 0
        exact = self.count <= self.capacity
        levels = np.array(self.quantiles)
        qs = np.quantile(self._sample_v, levels) if not empty else [None] * len(levels)
        return {
            "count": self.count,
            "non_finite": self.non_finite,
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "mean": None if empty else self.mean,
            "std": None if empty else math.sqrt(self._m2 / self.count),
            "quantiles": {f"{q:g}": (None if v is None else float(v)) for q, v in zip(self.quantiles, qs)},
            "quantile_method": "exact" if exact else f"key-hash bottom-k sample of {self.capacity} rows",
        }
