"""Exact top-k selection over a stream of scored batches, in O(k) memory.

Order: higher score first; equal scores broken by key (ascending), so a selection is the same
however the pool was split into batches, shards or actors. Rows without a finite score are never
selected.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TopK", "select_topk"]


@dataclass(order=True)
class _Entry:
    # Heap order = "worst first": lowest score, then the largest key.
    score: float
    neg_key: tuple[int, ...] = field(compare=True)
    key: str = field(compare=False)
    row: dict = field(compare=False)


def _negated(key: str) -> tuple[int, ...]:
    # Reverses string order for heapq's min-heap: larger keys compare as smaller.
    return tuple(-b for b in key.encode()) + (1,)


class TopK:
    """Running exact top-k.

    Args:
        k: how many rows to keep (> 0).
    """

    def __init__(self, k: int) -> None:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.k = k
        self._heap: list[_Entry] = []
        self.seen = 0

    def add(self, keys: Sequence[str], scores: np.ndarray, rows: Iterable[dict] | None = None) -> None:
        """Offer a batch. `rows` (same length) are kept with the selected keys."""
        scores = np.asarray(scores, dtype=np.float64)
        rows_list = list(rows) if rows is not None else None
        finite = np.flatnonzero(np.isfinite(scores))
        self.seen += len(scores)
        if len(finite) > self.k:
            # Only the batch's own top k (plus everything tied with its k-th) can enter.
            threshold = np.partition(scores[finite], len(finite) - self.k)[len(finite) - self.k]
            finite = finite[scores[finite] >= threshold]
        for i in finite:
            entry = _Entry(float(scores[i]), _negated(keys[i]), keys[i], rows_list[i] if rows_list else {})
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, entry)
            elif self._heap[0] < entry:
                heapq.heapreplace(self._heap, entry)

    def result(self) -> list[tuple[str, float, dict]]:
        """(key, score, row) best first."""
        ordered = sorted(self._heap, key=lambda e: (-e.score, e.key))
        return [(e.key, e.score, e.row) for e in ordered]


def select_topk(keys: Sequence[str], scores: np.ndarray, k: int) -> list[str]:
    """Keys of the exact top-k of one in-memory table (reference for the streaming merge)."""
    order = sorted((i for i in range(len(keys)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], keys[i]))
    return [keys[i] for i in order[:k]]
