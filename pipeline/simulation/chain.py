"""What every chain of a simulation shares: the protocol (set sizes, cycles, training recipe),
the seeded initial labeled set and the seeded random subset a query scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.acquisition import random_values
from pipeline.training import TrainSchedule

__all__ = ["SimulationProtocol", "initial_keys", "subset_rows"]


@dataclass(frozen=True)
class SimulationProtocol:
    """What every chain of a simulation shares."""

    initial: int
    per_cycle: int
    cycles: int  # training rounds; cycles - 1 queries
    subset: int | None
    schedule: TrainSchedule
    batch_size: int
    warm_start: bool
    augment: str
    candidates: int | None = None
    candidate_memory_mb: float = 1024.0
    clusters: int | None = None
    device: str = "cpu"


def initial_keys(keys: Sequence[str], size: int, seed: int) -> list[str]:
    """The seed's random initial labeled set: the ``size`` keys with the smallest seeded hash."""
    values = random_values(list(keys), seed)
    return [keys[i] for i in np.argsort(values, kind="stable")[:size]]


def subset_rows(keys: Sequence[str], unlabeled: np.ndarray, subset: int | None, seed: int) -> np.ndarray:
    """The random subset of unlabeled rows scored by one query (all of them without ``subset``)."""
    if subset is None or subset >= len(unlabeled):
        return unlabeled
    order = np.argsort(random_values([keys[i] for i in unlabeled], seed), kind="stable")
    return np.sort(unlabeled[order[:subset]])
