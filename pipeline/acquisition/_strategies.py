"""Acquisition strategies by name, and stochastic batch acquisition by Gumbel-top-k.

A strategy maps the per-sample score rows of one scoring pass (columns ``score`` = LPLgrad
gradient norm, ``entropy``, ``margin`` = p1 - p2, ``least_confidence`` = 1 - p1,
``predicted_loss`` = LossNet output, ``key``) to ONE acquisition value per sample, higher meaning
more worth labeling. Selection is separate (:mod:`pipeline.acquisition.selection`: exact streaming top-k).
A NaN value (a row that failed to score, or a missing LossNet output) stays NaN and is never
selected.

Stochastic batch acquisition (Kirsch, Farquhar, Atighehchian, Jesson, Branchaud-Charron, Gal,
"Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR 2023) samples
the batch without replacement from a distribution over the pool instead of taking the top-k:

- ``softmax``:  p_i ∝ exp(β s_i)
- ``power``:    p_i ∝ s_i^β          (s_i >= 0; s_i = 0 has probability 0)
- ``softrank``: p_i ∝ rank_i^(-β)    (rank 1 = highest s)

It is implemented as Gumbel-top-k (Kool, van Hoof, Welling, ICML 2019): with g_i i.i.d.
Gumbel(0, 1), the top-k of ``log p_i + g_i`` is an exact sample of k items without replacement
from p. The perturbed values are then selected by the same streaming top-k as every other
strategy, so the sample merges exactly across actors and batches. The noise g_i comes from a
seeded hash of the sample key (never a global generator), so the result does not depend on how
the pool was partitioned or ordered.

``softrank`` needs each value's rank among ALL scored rows, which no single batch knows: it is a
two-pass procedure. Pass 1 streams every acquisition value into :class:`ScoreRanks` (the job
reads them back from the run's ``scores/`` table); pass 2 calls
``stochastic_values("softrank", values, keys, beta, seed, ranks=score_ranks.ranks(values))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline._keyhash import key_uniforms

__all__ = [
    "STOCHASTIC_MODES",
    "STRATEGIES",
    "ScoreRanks",
    "Strategy",
    "acquisition_values",
    "available_strategies",
    "check_stochastic",
    "get_strategy",
    "gumbel_noise",
    "random_values",
    "register_strategy",
    "stochastic_values",
]

# Score rows: a dict of numpy arrays / pyarrow columns, or a pyarrow Table / RecordBatch.
Rows = Mapping[str, Any] | pa.Table | pa.RecordBatch

STOCHASTIC_MODES = ("softmax", "power", "softrank")


class _RowView:
    """Typed access to score-row columns, whatever container they came in."""

    def __init__(self, rows: Rows) -> None:
        self._rows = rows

    def _raw(self, name: str) -> Any:
        tabular = isinstance(self._rows, (pa.Table, pa.RecordBatch))
        names = self._rows.column_names if tabular else list(self._rows)
        if name not in names:
            raise KeyError(f"score rows have no column {name!r} (columns: {sorted(names)})")
        return self._rows.column(name) if tabular else self._rows[name]

    def floats(self, name: str) -> np.ndarray:
        """Column ``name`` as float64 [N]; pyarrow nulls become NaN."""
        column = self._raw(name)
        if isinstance(column, (pa.Array, pa.ChunkedArray)):
            column = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(column, dtype=np.float64)

    def keys(self) -> Sequence[str]:
        """The ``key`` column (strings)."""
        return self._raw("key")


@dataclass(frozen=True)
class Strategy:
    """One registered acquisition strategy.

    Attributes:
        name: Registry name, as used in configs.
        fields: Score-row columns it reads.
        nonnegative: Whether its values are always >= 0 (required by ``power`` sampling).
        compute: ``(rows, seed) -> values [N]``; ``seed`` matters only for random strategies.
    """

    name: str
    fields: tuple[str, ...]
    nonnegative: bool
    compute: Callable[[_RowView, int], np.ndarray]


_REGISTRY: dict[str, Strategy] = {}
STRATEGIES: Mapping[str, Strategy] = MappingProxyType(_REGISTRY)


def register_strategy(
    name: str, fields: Sequence[str], nonnegative: bool
) -> Callable[[Callable[[_RowView, int], np.ndarray]], Callable[[_RowView, int], np.ndarray]]:
    """Decorator registering ``compute(rows, seed) -> values [N]`` under ``name``.

    Args:
        name: Registry name used in configs.
        fields: Score-row columns ``compute`` reads (documentation, and which column a NaN test
            perturbs).
        nonnegative: Whether every value is >= 0, as ``power`` sampling requires.

    Returns:
        The decorator; it returns ``compute`` unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorate(compute: Callable[[_RowView, int], np.ndarray]) -> Callable[[_RowView, int], np.ndarray]:
        if name in _REGISTRY:
            raise ValueError(f"acquisition strategy {name!r} is already registered")
        _REGISTRY[name] = Strategy(name, tuple(fields), nonnegative, compute)
        return compute

    return decorate


def available_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """Look a strategy up by name.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown acquisition strategy {name!r}; available: {', '.join(available_strategies())}"
        ) from None


@register_strategy("lplgrad", ["score"], nonnegative=True)
def _lplgrad(rows: _RowView, seed: int) -> np.ndarray:
    # Gradient norm of the entropy: a larger expected update means more to learn.
    return rows.floats("score")


@register_strategy("entropy", ["entropy"], nonnegative=True)
def _entropy(rows: _RowView, seed: int) -> np.ndarray:
    return rows.floats("entropy")


@register_strategy("margin", ["margin"], nonnegative=False)
def _margin(rows: _RowView, seed: int) -> np.ndarray:
    # A small gap between the top two classes is the uncertain case, so negate: values are <= 0.
    return -rows.floats("margin")


@register_strategy("least-confidence", ["least_confidence"], nonnegative=True)
def _least_confidence(rows: _RowView, seed: int) -> np.ndarray:
    return rows.floats("least_confidence")


@register_strategy("lpl", ["predicted_loss"], nonnegative=False)
def _lpl(rows: _RowView, seed: int) -> np.ndarray:
    # LossNet ends in a plain linear layer: its predictions are only ordered, not >= 0.
    return rows.floats("predicted_loss")


@register_strategy("random", ["key"], nonnegative=True)
def _random(rows: _RowView, seed: int) -> np.ndarray:
    return random_values(rows.keys(), seed)


def acquisition_values(strategy: str, rows: Rows, seed: int = 0) -> np.ndarray:
    """Acquisition value of every sample under ``strategy``, higher = more worth labeling.

    Args:
        strategy: A registered name (see :func:`available_strategies`).
        rows: Score rows of N samples: a dict of numpy arrays or pyarrow columns, or a pyarrow
            Table / RecordBatch, holding at least the strategy's ``fields``.
        seed: Seed of the ``random`` strategy; ignored by the deterministic ones.

    Returns:
        float64 [N]; NaN where the input was NaN or null (never selected).

    Raises:
        ValueError: If ``strategy`` is unknown.
        KeyError: If a column the strategy needs is missing.
    """
    values = get_strategy(strategy).compute(_RowView(rows), seed)
    return np.asarray(values, dtype=np.float64)


def random_values(keys: Sequence[str], seed: int) -> np.ndarray:
    """Uniform (0, 1) value per key from blake2b(seed, key): reproducible, order-free.

    Args:
        keys: Sample keys [N].
        seed: Integer seed.

    Returns:
        float64 [N].
    """
    return key_uniforms(keys, seed, "lplgrad.random")


def gumbel_noise(keys: Sequence[str], seed: int) -> np.ndarray:
    """Gumbel(0, 1) noise per key, ``-log(-log(u))`` with u from blake2b(seed, key).

    Args:
        keys: Sample keys [N].
        seed: Integer seed; a different domain from :func:`random_values`, so the two are
            independent even with equal seeds.

    Returns:
        float64 [N], always finite.
    """
    return -np.log(-np.log(key_uniforms(keys, seed, "lplgrad.gumbel")))


def check_stochastic(mode: str, beta: float, strategy: str | None = None) -> None:
    """Validate a stochastic-acquisition setting before any work starts.

    Args:
        mode: One of :data:`STOCHASTIC_MODES`.
        beta: Inverse temperature, finite and > 0 (β → 0 is uniform sampling: use the
            ``random`` strategy; β → ∞ is top-k).
        strategy: The strategy whose values are sampled from, if known.

    Raises:
        ValueError: On an unknown mode, a bad beta, or ``power`` over a strategy whose values can
            be negative (``margin``, ``lpl``): use ``softmax`` or ``softrank`` for those.
    """
    if mode not in STOCHASTIC_MODES:
        raise ValueError(f"unknown stochastic mode {mode!r}; available: {', '.join(STOCHASTIC_MODES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if mode == "power" and strategy is not None and not get_strategy(strategy).nonnegative:
        raise ValueError(
            f"power sampling needs values >= 0 but strategy {strategy!r} can be negative; use mode softmax or softrank"
        )


def stochastic_values(
    mode: str,
    values: np.ndarray,
    keys: Sequence[str],
    beta: float,
    seed: int,
    *,
    ranks: np.ndarray | None = None,
) -> np.ndarray:
    """Gumbel-perturbed log-probabilities whose top-k is a sample without replacement.

    ``softmax``: β·s + g. ``power``: β·log(s) + g, so s = 0 gives -inf (probability 0, never
    selected; fewer than k rows may then be selected). ``softrank``: -β·log(rank) + g, with
    ``ranks`` from :class:`ScoreRanks` over every scored row (two passes, see the module doc).

    Args:
        mode: One of :data:`STOCHASTIC_MODES`.
        values: Acquisition values [N] (from :func:`acquisition_values`).
        keys: Sample keys [N]; they seed the per-key Gumbel noise g.
        beta: Inverse temperature (see :func:`check_stochastic`).
        seed: Integer seed of the noise.
        ranks: Global 1-based ranks [N]; required for ``softrank``, ignored otherwise.

    Returns:
        float64 [N]; NaN where ``values`` (or ``ranks``) is NaN.

    Raises:
        ValueError: On a bad mode or beta, mismatched lengths, negative values under ``power``,
            or ``softrank`` without ``ranks``.
    """
    check_stochastic(mode, beta)
    values = np.asarray(values, dtype=np.float64)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} keys for {len(values)} values")
    if mode == "softmax":
        log_p = beta * values
    elif mode == "power":
        if np.any(values < 0):
            raise ValueError("power sampling needs values >= 0; got negative values (use softmax or softrank)")
        with np.errstate(divide="ignore"):
            log_p = beta * np.log(values)
    else:
        if ranks is None:
            raise ValueError(
                "softrank needs global ranks: stream every scored value into ScoreRanks first, "
                "then pass ranks=score_ranks.ranks(values)"
            )
        ranks = np.asarray(ranks, dtype=np.float64)
        if ranks.shape != values.shape:
            raise ValueError(f"ranks shape {ranks.shape} != values shape {values.shape}")
        log_p = np.where(np.isnan(values), np.nan, -beta * np.log(ranks))
    return log_p + gumbel_noise(keys, seed)


class ScoreRanks:
    """Global ranks of acquisition values, for ``softrank`` (two passes over the scores).

    Pass 1: :meth:`add` every scored value. Pass 2: :meth:`ranks` of any batch. The rank is the
    competition rank 1 + #(values strictly greater): tied values share a rank and hence a
    probability, whatever their keys. Non-finite values are not ranked (NaN rank). Memory is one
    float64 per scored row (8 bytes/row, e.g. 80 MB for 10M rows): exact ranks need every value.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._sorted: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        """Add a batch of values (pass 1). Raises RuntimeError once ranks were read."""
        if self._sorted is not None:
            raise RuntimeError("ScoreRanks is frozen: add every value before calling ranks()")
        values = np.asarray(values, dtype=np.float64)
        self._chunks.append(values[np.isfinite(values)])

    def __len__(self) -> int:
        return len(self._sorted) if self._sorted is not None else sum(len(c) for c in self._chunks)

    def ranks(self, values: np.ndarray) -> np.ndarray:
        """1-based competition ranks of ``values`` [N] among all added values (float64, NaN if not finite)."""
        if self._sorted is None:
            self._sorted = np.sort(np.concatenate(self._chunks)) if self._chunks else np.empty(0)
            self._chunks = []
        values = np.asarray(values, dtype=np.float64)
        greater = len(self._sorted) - np.searchsorted(self._sorted, values, side="right")
        return np.where(np.isfinite(values), 1.0 + greater, np.nan)
