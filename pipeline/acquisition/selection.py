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

from pipeline.acquisition._strategies import available_strategies, check_stochastic, get_strategy
from pipeline.acquisition.cluster_margin import default_clusters
from pipeline.acquisition.diverse import DIVERSE_STRATEGIES

__all__ = ["DEFAULT_CANDIDATES_PER_PICK", "SelectionSpec", "TopK", "select_topk"]

# A diverse strategy's candidates (M) per row picked, when unset. Protocol D (docs/results.md) chose 2 on
# development seeds and confirmed it on twenty others: badge from the 2k smallest margins beat margin top-k;
# from 10k, a set so large it held most of that pool, the margin filter hardly filtered and it did not.
DEFAULT_CANDIDATES_PER_PICK = 2


@dataclass(frozen=True)
class SelectionSpec:
    """How a query picks its rows: the strategy, k, the draw, and for a diverse strategy its candidates.

    A per-sample strategy (``margin``, ``lplgrad``, ...) is selected by the streaming exact top-k or
    a stochastic draw. A diverse strategy (``badge``, ``cluster-margin``:
    :data:`~pipeline.acquisition.diverse.DIVERSE_STRATEGIES`) picks from the ``candidates``
    smallest-margin rows gathered with their embeddings, within ``candidate_memory_mb``.

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
        seed: Seed of the ``random`` strategy, of the draw's Gumbel noise and of a diverse
            strategy's draws.
        candidates: M, the smallest-margin rows a diverse strategy picks from (default ``2 * k``,
            at least k); ``None`` for per-sample strategies.
        candidate_memory_mb: The budget of the gathered candidates (M x (C + D) floats), checked
            before any scoring (default 1024 MiB); ``None`` for per-sample strategies.
        clusters: ``cluster-margin``'s k-means clusters (default
            :func:`~pipeline.acquisition.cluster_margin.default_clusters`); ``None`` otherwise.

    Raises:
        ValueError: On an unknown strategy, k <= 0, a bad stochastic mode or beta, a stochastic
            diverse strategy, or candidate settings that do not fit.
    """

    strategy: str
    k: int
    stochastic: str | None = None
    beta: float | None = None
    seed: int = 0
    candidates: int | None = None
    candidate_memory_mb: float | None = None
    clusters: int | None = None

    def __post_init__(self) -> None:
        known = (*available_strategies(), *sorted(DIVERSE_STRATEGIES))
        if self.strategy not in known:
            raise ValueError(f"strategy {self.strategy!r} is unknown; choose one of {', '.join(known)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        # frozen: the normalisations happen here, once, so equal selections compare (and fingerprint) equal
        if self.stochastic is None:
            object.__setattr__(self, "beta", None)
        elif self.is_diverse:
            raise ValueError(f"{self.strategy} has no stochastic variant: leave stochastic unset")
        else:
            check_stochastic(self.stochastic, self.beta, self.strategy)
        if not self.is_diverse:
            for name in ("candidates", "candidate_memory_mb", "clusters"):
                object.__setattr__(self, name, None)
            return
        candidates = DEFAULT_CANDIDATES_PER_PICK * self.k if self.candidates is None else self.candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < self.k:
            raise ValueError(f"candidates must be an integer >= k={self.k}, got {self.candidates}")
        budget = 1024.0 if self.candidate_memory_mb is None else float(self.candidate_memory_mb)
        if not budget > 0:
            raise ValueError(f"candidate_memory_mb must be positive, got {self.candidate_memory_mb}")
        clusters = None
        if DIVERSE_STRATEGIES[self.strategy].clustered:
            clusters = default_clusters(self.k, candidates) if self.clusters is None else self.clusters
            if isinstance(clusters, bool) or not isinstance(clusters, int) or not 0 < clusters <= candidates:
                raise ValueError(f"clusters must be an integer in [1, candidates={candidates}], got {self.clusters}")
        object.__setattr__(self, "candidates", candidates)
        object.__setattr__(self, "candidate_memory_mb", budget)
        object.__setattr__(self, "clusters", clusters)

    @property
    def needs_gradnorm(self) -> bool:
        """Whether the selection reads the LPLgrad gradient norm, so scoring must run the backward pass."""
        return not self.is_diverse and "score" in get_strategy(self.strategy).fields

    @property
    def is_diverse(self) -> bool:
        """Whether the strategy picks from gathered candidates rather than by per-sample values."""
        return self.strategy in DIVERSE_STRATEGIES

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SelectionSpec:
        """A spec from :meth:`to_dict`'s dict.

        Raises:
            ValueError: On unknown or missing fields, or an invalid spec.
        """
        known = {"strategy", "k", "stochastic", "beta", "seed", "candidates", "candidate_memory_mb", "clusters"}
        if set(values) - known or not {"strategy", "k"} <= set(values):
            raise ValueError(
                f"a selection spec has fields {sorted(known)} (strategy and k required), got {sorted(values)}"
            )
        return cls(**values)

    def manifest_params(self) -> dict[str, Any]:
        """This spec's entries of the manifest's ``inputs.strategy.params``; a diverse strategy adds
        its method, M (``candidates``), the memory budget and its clusters."""
        params = {"seed": self.seed, "stochastic": self.stochastic, "beta": self.beta}
        if self.is_diverse:
            params.update(
                method=DIVERSE_STRATEGIES[self.strategy].method,
                candidates=self.candidates,
                candidate_memory_mb=self.candidate_memory_mb,
                clusters=self.clusters,
            )
        return params

    @classmethod
    def from_manifest(cls, strategy: str, k: int, params: Mapping[str, Any]) -> SelectionSpec:
        """The spec a manifest recorded (``inputs.strategy.name``, ``inputs.k``,
        ``inputs.strategy.params``; params it does not know, such as ``norm``, are ignored)."""
        return cls(
            strategy,
            k,
            params.get("stochastic"),
            params.get("beta"),
            int(params.get("seed", 0)),
            params.get("candidates"),
            params.get("candidate_memory_mb"),
            params.get("clusters"),
        )


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
