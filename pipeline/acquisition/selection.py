"""What a query selects (:class:`SelectionSpec`) and the exact top-k over a stream of scored
batches, in O(k) memory.

Order: higher score first; equal scores broken by key (ascending), so a selection is the same
however the pool was split into batches, shards or actors. Rows without a finite score are never
selected.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.acquisition._strategies import available_strategies, check_stochastic

__all__ = ["SelectionSpec", "TopK", "select_topk"]


@dataclass(frozen=True)
class SelectionSpec:
    """How a query picks its rows from the acquisition values: the strategy, k and the draw.

    It is also what the run manifest records as ``inputs.strategy`` (name, and the params other
    than scoring ones such as ``norm``) and ``inputs.k``
    (``pipeline.manifest.QueryInputs.for_selection``), so the recorded selection is the one made.

    Attributes:
        strategy: A registered strategy name (:func:`available_strategies`).
        k: Rows to select (> 0).
        stochastic: ``None`` for the exact top-k, else a stochastic mode (``softmax``, ``power``,
            ``softrank``) drawing k rows without replacement.
        beta: Inverse temperature of the draw. Without a draw it means nothing and is stored as
            ``None``, so two exact top-k specs compare (and fingerprint) equal whatever beta was given.
        seed: Seed of the ``random`` strategy and of the draw's Gumbel noise.

    Raises:
        ValueError: On an unknown strategy, k <= 0, or a bad stochastic mode or beta.
    """

    strategy: str
    k: int
    stochastic: str | None = None
    beta: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in available_strategies():
            raise ValueError(
                f"strategy {self.strategy!r} is unknown; choose one of {', '.join(available_strategies())}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.stochastic is None:
            object.__setattr__(self, "beta", None)  # frozen: the one normalisation, at construction
        else:
            check_stochastic(self.stochastic, self.beta, self.strategy)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SelectionSpec:
        """A spec from :meth:`to_dict`'s dict.

        Raises:
            ValueError: On unknown or missing fields, or an invalid spec.
        """
        known = {"strategy", "k", "stochastic", "beta", "seed"}
        if set(values) - known or not {"strategy", "k"} <= set(values):
            raise ValueError(
                f"a selection spec has fields {sorted(known)} (strategy and k required), got {sorted(values)}"
            )
        return cls(**values)

    def manifest_params(self) -> dict[str, Any]:
        """This spec's entries of the manifest's ``inputs.strategy.params``."""
        return {"seed": self.seed, "stochastic": self.stochastic, "beta": self.beta}

    @classmethod
    def from_manifest(cls, strategy: str, k: int, params: Mapping[str, Any]) -> SelectionSpec:
        """The spec a manifest recorded (``inputs.strategy.name``, ``inputs.k``,
        ``inputs.strategy.params``; params it does not know, such as ``norm``, are ignored)."""
        return cls(strategy, k, params.get("stochastic"), params.get("beta"), int(params.get("seed", 0)))


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
