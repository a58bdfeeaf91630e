"""The in-memory engine's steps of a chain (`lplgrad simulate engine=memory`): train with the
library's joint step on the decoded arrays, evaluate on the whole test pool, query with the
library's scorer (`query_in_memory`, where its strategy dispatch lives).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.acquisition import DIVERSE_STRATEGIES, Chain, SelectionSpec, check_candidate_memory
from pipeline.augment import make_augment
from pipeline.checkpoint import ModelSpec
from pipeline.pools import DecodeSpec, spec_for_model
from pipeline.simulation.arrays import ArrayPool, load_array_pool
from pipeline.simulation.chain import SimulationProtocol, subset_rows
from pipeline.simulation.config import SimulateConfig
from pipeline.simulation.fit import TrainedModel, evaluate, train_in_memory
from pipeline.simulation.loop import CycleModel, Picked
from pipeline.simulation.query import classifier_head, query_in_memory

__all__ = ["InMemorySteps", "check_candidate_budget", "in_memory"]


class InMemorySteps:
    """One chain (strategy, seed) on arrays in this process: a `ChainSteps` for `run_cycles`."""

    def __init__(
        self,
        chain: Chain,
        seed: int,
        pool: ArrayPool,
        test: ArrayPool,
        spec: ModelSpec,
        decode: DecodeSpec,
        protocol: SimulationProtocol,
    ) -> None:
        self.chain, self.seed, self.pool, self.test = chain, seed, pool, test
        self.spec, self.protocol = spec, protocol
        self.augment = make_augment(protocol.augment, decode.mean, decode.std)
        self.index = pool.index()

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        return np.array([self.index[k] for k in keys], dtype=np.int64)

    def label(self, labeled: Sequence[str], cycle: int) -> None:
        """Nothing to write: the arrays hold every true label."""

    def train(self, labeled: Sequence[str], cycle: int, warm: CycleModel | None) -> CycleModel:
        rows = self.rows(labeled)
        trained = train_in_memory(
            self.spec,
            self.pool.images[rows],
            self.pool.labels[rows],
            self.protocol.schedule,
            batch_size=self.protocol.batch_size,
            seed=self.seed * 1000 + cycle,
            augment=self.augment,
            warm_start=None if warm is None else warm.handle.state(),
            device=self.protocol.device,
        )
        accuracy = evaluate(trained.model, self.test.images, self.test.labels)
        return CycleModel(trained, accuracy, trained.train_accuracy, trained.seconds)

    def scorer(
        self, model: CycleModel, labeled: Sequence[str], cycle: int, last: bool
    ) -> tuple[TrainedModel, dict[str, Any]]:
        return model.handle, {}

    def query(self, scorer: TrainedModel, labeled: Sequence[str], cycle: int) -> Picked:
        seed = self.seed * 1000 + cycle
        labeled_rows = self.rows(labeled)
        is_labeled = np.zeros(len(self.pool), dtype=bool)
        is_labeled[labeled_rows] = True
        candidates = subset_rows(self.pool.keys, np.flatnonzero(~is_labeled), self.protocol.subset, seed + 1)
        picked, mean_score = query_in_memory(
            self.chain,
            scorer,
            self.pool.images,
            self.pool.keys,
            candidates,
            labeled_rows,
            self.protocol.per_cycle,
            seed,
            self.protocol.candidate_memory_mb,
            self.protocol.candidates,
            self.protocol.clusters,
        )
        return Picked([self.pool.keys[i] for i in picked], mean_score)


def check_candidate_budget(
    chains: Sequence[Chain],
    spec: ModelSpec,
    k: int,
    budget_mb: float,
    scoreable: int | None = None,
    candidates: int | None = None,
) -> None:
    """Refuse, before any training, a diverse chain (``badge``, ``cluster-margin``) whose candidate set
    would not fit ``budget_mb``: the M (``candidates``, default 2 k) smallest-margin rows a query gathers (at most
    ``scoreable``), each ``C + D`` floats (``check_candidate_memory``, the bound the query job checks
    before scoring).

    Args:
        chains: The simulation's chains.
        spec: The model (C and D are read off its classifier head).
        k: Rows picked per query.
        budget_mb: The candidate set's budget in MiB.
        scoreable: Rows a query scores at most (the in-memory engine's subset or pool); ``None``
            for the query job, which sizes its gatherer by M alone.
        candidates: M; ``None`` for the default.

    Raises:
        CandidateMemoryError: Naming M, C, D, the bytes and the budget.
    """
    if not any(c.strategy in DIVERSE_STRATEGIES for c in chains):
        return
    head = classifier_head(spec.build()[0])
    m = SelectionSpec("badge", k, candidates=candidates, candidate_memory_mb=budget_mb).candidates
    size = m if scoreable is None else max(1, min(m, scoreable))
    check_candidate_memory(size, head.out_features, head.in_features, budget_mb)


def in_memory(
    config: SimulateConfig, protocol: SimulationProtocol
) -> tuple[Callable[[Chain, str, int], InMemorySteps], dict[str, int], list[str]]:
    """engine=memory: decode both pools into memory once; (steps per chain, mode and seed, every
    key's true label, the class names).

    Raises:
        CandidateMemoryError: A diverse chain whose candidate set would not fit its budget (before any training).
        ValueError: A pool sample without a label, or a pool in which nothing decoded.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    pool = load_array_pool(config.pool, spec_for_model(config.model), config.storage_options)
    # The test pool is decoded against the pool's class list, so a stray test label is named.
    decode = spec_for_model(config.model, num_classes=len(pool.classes))
    test = load_array_pool(config.test_pool or config.pool, decode, config.storage_options)
    skipped = len(pool.skipped) + len(test.skipped)
    print(
        f"decoded {len(pool)} pool and {len(test)} test samples in {time.perf_counter() - started:.0f} s"
        + (f"; {skipped} could not be decoded and are left out" if skipped else "")
    )
    spec = ModelSpec(config.model, len(pool.classes))
    scoreable = min(config.subset or len(pool), len(pool))
    check_candidate_budget(
        config.chains(), spec, config.per_cycle, config.candidate_memory_mb, scoreable, config.candidates
    )

    def steps(chain: Chain, mode: str, seed: int) -> InMemorySteps:
        return InMemorySteps(chain, seed, pool, test, spec, decode, protocol)

    return steps, dict(zip(pool.keys, pool.labels.tolist())), list(pool.classes)
