"""Simulated active learning on arrays: one chain (strategy and seed) through every cycle.

Per cycle: train on the labeled rows (`train_in_memory`), measure test accuracy on the whole
test pool, query the unlabeled rows (a random subset, as in the paper), add the picks. The
first cycle depends only on the seed, so chains of one seed share it (`FirstCycles`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.acquisition import Chain, random_values
from pipeline.augment import make_augment
from pipeline.checkpoint import ModelSpec
from pipeline.pools import DecodeSpec
from pipeline.simulation.arrays import ArrayPool
from pipeline.simulation.fit import NetworkWeights, TrainedModel, evaluate, train_in_memory
from pipeline.simulation.query import query_in_memory
from pipeline.training import TrainSchedule

__all__ = ["FirstCycles", "Protocol", "initial_keys", "run_chain_in_memory", "subset_rows"]


@dataclass(frozen=True)
class Protocol:
    """What every chain of a simulation shares."""

    initial: int
    per_cycle: int
    cycles: int  # training rounds; cycles - 1 queries
    subset: int | None
    schedule: TrainSchedule
    batch_size: int
    warm_start: bool
    augment: str
    badge_memory_mb: float = 2048.0
    device: str = "cpu"


@dataclass
class FirstCycles:
    """The first cycle's trained state per seed, shared by every chain of that seed."""

    by_seed: dict[int, tuple[NetworkWeights, float, float]] = field(
        default_factory=dict
    )  # weights, train accuracy, seconds


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


def _train(
    spec: ModelSpec,
    pool: ArrayPool,
    rows: np.ndarray,
    protocol: Protocol,
    decode: DecodeSpec,
    seed: int,
    warm: NetworkWeights | None,
) -> TrainedModel:
    return train_in_memory(
        spec,
        pool.images[rows],
        pool.labels[rows],
        protocol.schedule,
        batch_size=protocol.batch_size,
        seed=seed,
        augment=make_augment(protocol.augment, decode.mean, decode.std),
        warm_start=warm,
        device=protocol.device,
    )


def run_chain_in_memory(
    chain: Chain,
    seed: int,
    pool: ArrayPool,
    test: ArrayPool,
    spec: ModelSpec,
    decode: DecodeSpec,
    protocol: Protocol,
    first: FirstCycles,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:
    """Run one chain; returns its result rows (one per cycle), each also passed to ``on_row``."""
    index = pool.index()
    labeled = np.array([index[k] for k in initial_keys(sorted(pool.keys), protocol.initial, seed)], dtype=np.int64)
    is_labeled = np.zeros(len(pool), dtype=bool)
    is_labeled[labeled] = True
    rows, warm = [], None
    for cycle in range(protocol.cycles):
        if cycle == 0 and seed in first.by_seed:
            weights, train_accuracy, seconds = first.by_seed[seed]
            trained = _restore(spec, weights, train_accuracy, seconds, protocol.device)
        else:
            trained = _train(
                spec, pool, labeled, protocol, decode, seed * 1000 + cycle, warm if protocol.warm_start else None
            )
            if cycle == 0:
                first.by_seed[seed] = (trained.state(), trained.train_accuracy, trained.seconds)
        warm = trained.state() if protocol.warm_start else None
        row: dict[str, Any] = {
            "strategy": chain.name,
            "mode": "full",
            "seed": seed,
            "cycle": cycle,
            "labeled": int(len(labeled)),
            "test_accuracy": evaluate(trained.model, test.images, test.labels),
            "train_accuracy": trained.train_accuracy,
            "train_seconds": trained.seconds,
            "query_seconds": None,
            "class_mix": None,
            "mean_score": None,
        }
        if cycle < protocol.cycles - 1:
            started = time.perf_counter()
            query_seed = seed * 1000 + cycle
            candidates = subset_rows(pool.keys, np.flatnonzero(~is_labeled), protocol.subset, query_seed + 1)
            picked, mean_score = query_in_memory(
                chain,
                trained,
                pool.images,
                pool.keys,
                candidates,
                labeled,
                protocol.per_cycle,
                query_seed,
                protocol.badge_memory_mb,
            )
            picked = np.asarray(picked, dtype=np.int64)
            row["query_seconds"] = time.perf_counter() - started
            # JSON text, so the CSV twin of results.parquet can hold it: selected count per class.
            row["class_mix"] = json.dumps(np.bincount(pool.labels[picked], minlength=len(pool.classes)).tolist())
            row["mean_score"] = None if np.isnan(mean_score) else mean_score
            labeled = np.concatenate([labeled, picked])
            is_labeled[picked] = True
        on_row(row)
        rows.append(row)
    return rows


def _restore(
    spec: ModelSpec, weights: NetworkWeights, train_accuracy: float, seconds: float, device: str
) -> TrainedModel:
    model, lossnet, tap = spec.build()
    weights.load_into(model, lossnet)
    model.to(device).eval()
    lossnet.to(device).eval()
    return TrainedModel(model, lossnet, tap, train_accuracy, seconds)
