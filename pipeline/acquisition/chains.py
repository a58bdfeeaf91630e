"""Acquisition chains: a strategy, optionally drawn stochastically, named like ``lplgrad+power``.

A chain is what a simulation compares and what a user deploys: a per-sample strategy from the
registry (``lplgrad``, ``entropy``, ...) selected by exact top-k, the same strategy sampled
with one of the stochastic modes of Kirsch et al. (``lplgrad+power``, ``margin+softrank``), or
one of the set functions that pick from a gathered matrix (``coreset``, ``badge``,
``cluster-margin``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.acquisition._strategies import (
    STOCHASTIC_MODES,
    ScoreRanks,
    acquisition_values,
    available_strategies,
    check_stochastic,
    stochastic_values,
)
from pipeline.acquisition.selection import select_topk

__all__ = ["SET_STRATEGIES", "Chain", "parse_chain", "select_by_values"]

# Each pick depends on the previous ones. badge and cluster-margin pick from the smallest-margin
# candidates with their embeddings (pipeline.acquisition.diverse), as lplgrad query does.
SET_STRATEGIES = ("coreset", "badge", "cluster-margin")


@dataclass(frozen=True)
class Chain:
    """One acquisition chain.

    Attributes:
        strategy: A registered per-sample strategy or one of :data:`SET_STRATEGIES`.
        stochastic: None for top-k, else one of ``STOCHASTIC_MODES``.
        beta: Inverse temperature of the stochastic draw.
    """

    strategy: str
    stochastic: str | None = None
    beta: float = 1.0

    @property
    def name(self) -> str:
        return self.strategy if self.stochastic is None else f"{self.strategy}+{self.stochastic}"

    @property
    def is_set_function(self) -> bool:
        return self.strategy in SET_STRATEGIES


def parse_chain(text: str, beta: float = 1.0) -> Chain:
    """``"entropy"``, ``"lplgrad+power"``, ``"badge"`` -> :class:`Chain`.

    Raises:
        ValueError: An unknown strategy or mode, a stochastic set function or ``random``, or
            ``power`` over a strategy whose values can be negative; the message lists the choices.
    """
    strategy, _, mode = text.partition("+")
    known = (*available_strategies(), *SET_STRATEGIES)
    if strategy not in known:
        raise ValueError(f"unknown strategy {strategy!r} in {text!r}; choose from {', '.join(known)}")
    if not mode:
        return Chain(strategy, None, beta)
    if strategy in SET_STRATEGIES or strategy == "random":
        raise ValueError(f"{text!r}: {strategy} has no stochastic variant (it is already a set or random draw)")
    if mode not in STOCHASTIC_MODES:
        raise ValueError(f"unknown stochastic mode {mode!r} in {text!r}; choose from {', '.join(STOCHASTIC_MODES)}")
    check_stochastic(mode, beta, strategy)
    return Chain(strategy, mode, beta)


def select_by_values(chain: Chain, rows: Mapping[str, Sequence], k: int, seed: int) -> list[str]:
    """The keys a per-sample chain selects from score rows held in memory.

    Args:
        chain: A per-sample chain (not a set function).
        rows: Score columns of N rows, with ``key`` (see :func:`acquisition_values`).
        k: Batch size.
        seed: Seed of ``random`` and of the stochastic draw's Gumbel noise.

    Returns:
        Up to k keys, best first (ties broken by key, as in the query job's streaming top-k).
    """
    if chain.is_set_function:
        raise ValueError(f"{chain.name} is a set function: it selects from embeddings, not per-sample values")
    keys = list(rows["key"])
    values = acquisition_values(chain.strategy, rows, seed)
    if chain.stochastic is not None:
        ranks = None
        if chain.stochastic == "softrank":
            ranker = ScoreRanks()
            ranker.add(values)
            ranks = ranker.ranks(values)
        values = stochastic_values(chain.stochastic, values, keys, chain.beta, seed, ranks=ranks)
    finite = np.isfinite(values)
    return select_topk([k for k, ok in zip(keys, finite) if ok], values[finite], k)
