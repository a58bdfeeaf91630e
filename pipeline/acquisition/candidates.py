"""The candidate set of the diverse strategies (``badge``, ``cluster-margin``): the M scored rows
with the smallest margin, with their embeddings, gathered from a stream of scored batches.

Each candidate keeps two small vectors, never their ``C x D`` outer product:

- ``residual``: ``p - onehot(argmax p)`` [C], the softmax output minus the predicted label, which is
  the gradient of the cross-entropy at the predicted label with respect to the logits;
- ``features``: the penultimate features h(x) [D], the inputs of the classifier's last linear layer.

BADGE's gradient embedding is ``residual ⊗ features`` (:mod:`pipeline.acquisition.badge`), and
Cluster-Margin clusters ``features`` (:mod:`pipeline.acquisition.cluster_margin`). Both strategies
pick among the smallest-margin M rows, as Cluster-Margin does (Citovsky et al., NeurIPS 2021).

Memory is M x (C + D) float32 plus O(M) keys and scalars, whatever the pool's size: the gatherer
fills preallocated arrays and replaces evicted rows in place. The set is exact for its definition:
the M smallest margins, ties broken by key (ascending), so it does not depend on how the pool was
split into batches, shards or actors. :func:`check_candidate_memory` refuses, before any scoring,
an M that would not fit the stated budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CandidateGatherer",
    "CandidateMemoryError",
    "Candidates",
    "candidate_bytes",
    "check_candidate_memory",
    "classifier_head",
    "prediction_residuals",
]

# Per-candidate bytes besides the two vectors: the float64 margin and an int64 slot order.
_SCALAR_BYTES = 16


class CandidateMemoryError(ValueError):
    """The candidate set (M x (C + D) floats) would exceed the stated memory budget."""


def candidate_bytes(candidates: int, num_classes: int, feature_dim: int) -> int:
    """Bytes the gatherer's arrays hold for M candidates: float32 ``residual`` and ``features``
    (M x (C + D) x 4) plus a float64 margin and an int64 per row; keys come on top (one Python
    string each)."""
    return candidates * ((num_classes + feature_dim) * 4 + _SCALAR_BYTES)


def check_candidate_memory(candidates: int, num_classes: int, feature_dim: int, budget_mb: float) -> int:
    """Bytes of the candidate set; raises when it exceeds ``budget_mb``. Call it before scoring.

    Args:
        candidates: M, the rows kept.
        num_classes: C.
        feature_dim: D, the penultimate width (the classifier's ``in_features``).
        budget_mb: Allowed size in MiB.

    Returns:
        The size in bytes (:func:`candidate_bytes`).

    Raises:
        CandidateMemoryError: Naming M, C, D, the bytes, the budget and how to fit it.
        ValueError: If a size is not positive.
    """
    if min(candidates, num_classes, feature_dim) <= 0 or not budget_mb > 0:
        raise ValueError(
            f"candidate sizes must be positive: M={candidates}, C={num_classes}, D={feature_dim}, "
            f"budget={budget_mb} MiB"
        )
    size = candidate_bytes(candidates, num_classes, feature_dim)
    if size > budget_mb * 2**20:
        raise CandidateMemoryError(
            f"the candidate set needs M={candidates} x (C={num_classes} + D={feature_dim}) float32 "
            f"= {size:,} bytes ({size / 2**20:.1f} MiB), over the budget of {budget_mb:g} MiB "
            "(set candidates= smaller, or raise candidate_memory_mb=)"
        )
    return size


def classifier_head(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear``: its inputs are the penultimate features, its outputs the logits.

    Raises:
        ValueError: If the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier: badge and cluster-margin need one")
    return linears[-1]


def prediction_residuals(logits: Tensor) -> Tensor:
    """``p - onehot(argmax p)`` [B, C] float32 from logits [B, C]: the cross-entropy's gradient
    with respect to the logits at the predicted label (argmax ties go to the first class)."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs - torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)


@dataclass(frozen=True)
class Candidates:
    """A gathered candidate set, in canonical order: margin ascending, then key ascending.

    Attributes:
        keys: [M'] sample keys (M' <= M: fewer when fewer rows scored).
        margins: [M'] float64, p1 - p2.
        residuals: [M', C] float32, ``p - onehot(argmax p)``.
        features: [M', D] float32, penultimate features.
        extras: [M'] per-row scalar columns carried along (shard, score statistics), by name.
    """

    keys: list[str]
    margins: np.ndarray
    residuals: np.ndarray
    features: np.ndarray
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The extras and ``key`` of the given candidates, as columns."""
        index = np.asarray(indices, dtype=np.int64)
        picked = {name: np.asarray(values)[index] for name, values in self.extras.items()}
        picked["key"] = np.asarray(self.keys, dtype=object)[index]
        return picked


class CandidateGatherer:
    """Running set of the M smallest-margin rows with their embeddings (see the module doc).

    Args:
        capacity: M (> 0).
        num_classes: C, the width of ``residuals``.
        feature_dim: D, the width of ``features``.
        extras: Names of per-row scalar columns to keep with each candidate.
    """

    def __init__(self, capacity: int, num_classes: int, feature_dim: int, extras: Sequence[str] = ()) -> None:
        if capacity <= 0 or num_classes <= 0 or feature_dim <= 0:
            raise ValueError(
                f"capacity, num_classes and feature_dim must be positive: {capacity}, {num_classes}, {feature_dim}"
            )
        self.capacity = capacity
        self._margins = np.full(capacity, np.inf)
        self._keys = np.empty(capacity, dtype=object)
        self._residuals = np.zeros((capacity, num_classes), np.float32)
        self._features = np.zeros((capacity, feature_dim), np.float32)
        self._extra_names = tuple(extras)
        self._extras: dict[str, np.ndarray] = {}  # typed like the first batch's columns (strings: object)
        self._count = 0
        self.offered = 0  # rows offered with a finite margin

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (keys and extras as object pointers)."""
        arrays = [self._margins, self._keys, self._residuals, self._features, *self._extras.values()]
        return sum(a.nbytes for a in arrays)

    def add(
        self,
        keys: Sequence[str],
        margins: np.ndarray,
        residuals: np.ndarray,
        features: np.ndarray,
        extras: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Offer a batch of N rows; rows with a non-finite margin (error rows) never enter.

        Args:
            keys: [N] sample keys (unique across the stream).
            margins: [N] p1 - p2.
            residuals: [N, C] ``p - onehot(argmax p)``.
            features: [N, D] penultimate features.
            extras: [N] columns for every name given at construction.

        Raises:
            ValueError: On mismatched lengths or widths, or missing extras.
        """
        margins = np.asarray(margins, dtype=np.float64)
        n = len(margins)
        if len(keys) != n or len(residuals) != n or len(features) != n:
            raise ValueError(f"{len(keys)} keys, {n} margins, {len(residuals)} residuals, {len(features)} features")
        if np.shape(residuals)[1:] != self._residuals.shape[1:] or np.shape(features)[1:] != self._features.shape[1:]:
            raise ValueError(
                f"embeddings of widths {np.shape(residuals)[1:]} and {np.shape(features)[1:]}, expected "
                f"C={self._residuals.shape[1]} and D={self._features.shape[1]}"
            )
        extras = extras or {}
        if missing := sorted(set(self._extra_names) - set(extras)):
            raise ValueError(f"the batch lacks the extra columns {missing}")
        rows = np.flatnonzero(np.isfinite(margins))
        self.offered += len(rows)
        if not len(rows):
            return
        batch_keys = np.asarray(keys, dtype=object)
        if self._count == self.capacity:
            # Only rows ahead of the current worst candidate can enter.
            worst = self._worst()
            m, k = margins[rows], batch_keys[rows]
            ahead = (m < self._margins[worst]) | ((m == self._margins[worst]) & (k < self._keys[worst]))
            rows = rows[ahead]
            if not len(rows):
                return
        # The best M of (held rows + offered rows): held ones it drops free their slots.
        union_margins = np.concatenate([self._margins[: self._count], margins[rows]])
        union_keys = np.concatenate([self._keys[: self._count], batch_keys[rows]])
        best = _smallest(union_margins, union_keys, self.capacity)
        kept = np.zeros(len(union_margins), dtype=bool)
        kept[best] = True
        free = np.concatenate([np.flatnonzero(~kept[: self._count]), np.arange(self._count, self.capacity)])
        entering = rows[np.flatnonzero(kept[self._count :])]
        slots = free[: len(entering)]
        self._margins[slots] = margins[entering]
        self._keys[slots] = batch_keys[entering]
        self._residuals[slots] = np.asarray(residuals)[entering]
        self._features[slots] = np.asarray(features)[entering]
        for name in self._extra_names:
            values = np.asarray(extras[name])
            values = values.astype(object) if values.dtype.kind in "USO" else values
            if name not in self._extras:
                self._extras[name] = np.zeros(self.capacity, dtype=values.dtype)
            self._extras[name][slots] = values[entering]
        self._count = min(self.capacity, self._count + len(entering))

    def result(self) -> Candidates:
        """The candidates in canonical order (margin, then key, ascending)."""
        count = self._count
        order = np.lexsort((self._keys[:count].astype(str), self._margins[:count])) if count else np.empty(0, int)
        return Candidates(
            keys=self._keys[order].tolist(),
            margins=self._margins[order].copy(),
            residuals=self._residuals[order],
            features=self._features[order],
            extras={name: self._extras[name][order] for name in self._extra_names if name in self._extras},
        )

    def _worst(self) -> int:
        """Slot of the held row that leaves first: the largest margin, then the largest key."""
        largest = self._margins[: self._count].max()
        tied = np.flatnonzero(self._margins[: self._count] == largest)
        return int(tied[np.argmax(self._keys[tied].astype(str))]) if len(tied) > 1 else int(tied[0])


def _smallest(margins: np.ndarray, keys: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m smallest (margin, key) pairs, exactly, in O(n) plus a sort of the ties."""
    if len(margins) <= m:
        return np.arange(len(margins))
    threshold = np.partition(margins, m - 1)[m - 1]
    below = np.flatnonzero(margins < threshold)
    tied = np.flatnonzero(margins == threshold)
    tied = tied[np.argsort(keys[tied].astype(str), kind="stable")][: m - len(below)]
    return np.concatenate([below, tied])
