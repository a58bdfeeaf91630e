"""Row filters that run in Ray Data's read tasks ahead of decoding and scoring: the random subset,
shard-restricted reads and exclusions, for image rows and for feature-store rows.

Excluded rows are dropped here, before they cost any decoding or scoring, and recorded here: each
filter sends the (key, shard) of the rows it dropped to an :data:`ExcludedRows` actor, which the
driver reads once the pipeline is exhausted (the manifest counts them and lists them in
excluded.parquet). The actor keeps one row per key, so a task that Ray runs again (a retry, a
re-executed block) does not count its rows twice; pool keys are unique, so that is exactly one row
per excluded sample.

Kept apart from `querying` on purpose: a task's function is imported by module in every
worker process that runs it, and querying pulls in torch (seconds per process), while
these need only numpy, pyarrow and ray. Many small read tasks start many worker processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import ray

from pipeline.acquisition import random_values
from pipeline.proxy.store import keep_current

__all__ = ["ExcludedRowSet", "ExcludedRows", "drop_excluded", "prefilter_raw", "store_prefilter"]


class ExcludedRowSet:
    """(key, shard) of the pool rows an exclusion dropped, once per key (first shard seen wins;
    a key is in one shard of a pool, so a repeat is the same row seen again)."""

    def __init__(self) -> None:
        self._shards: dict[str, str] = {}

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """Record (key, shard) pairs; a key already recorded is ignored."""
        for key, shard in rows:
            self._shards.setdefault(key, shard)

    def rows(self) -> list[tuple[str, str]]:
        """Every recorded (key, shard), in the order first recorded."""
        return list(self._shards.items())

    def __len__(self) -> int:
        return len(self._shards)


# The read tasks' shared record, one per query. No CPU: it must never wait for a slot that the
# read tasks calling it hold.
ExcludedRows = ray.remote(num_cpus=0)(ExcludedRowSet)


def _record(excluded_rows: Any, rows: list[tuple[str, str]]) -> None:
    if excluded_rows is None:
        raise ValueError(
            "excluded rows were dropped with nowhere to record them: pass excluded_rows (an ExcludedRows actor)"
        )
    # Waited for: once a task has returned its block, its rows are in the actor, so the driver
    # reading the actor after the last block has every row.
    ray.get(excluded_rows.add.remote(rows))


def prefilter_raw(
    batch: dict[str, np.ndarray],
    excluded: frozenset[str],
    fraction: float | None,
    seed: int,
    only: Mapping[str, frozenset[str]] | None = None,
    *,
    excluded_rows: Any = None,
    shard_prefix: str = "",
) -> dict[str, np.ndarray]:
    """Raw rows -> raw rows: drop rows outside the random subset or, in the shards `only` names
    (by path), rows not among its keys; drop excluded rows and record them in `excluded_rows`.

    Args:
        batch: Raw rows (``__key__``, ``__url__`` and the payload columns).
        excluded: Keys never to score.
        fraction: Keep about this fraction of the rows (by key hash); ``None`` keeps all.
        seed: Seed of the subset.
        only: Shard path -> the only keys to read from it.
        excluded_rows: An :data:`ExcludedRows` actor; required when a row is excluded.
        shard_prefix: Prepended to ``__url__`` gives the shard URI recorded (``RawPool.shard_prefix``).
    """
    keys = batch["__key__"].tolist()
    keep = np.ones(len(keys), dtype=bool)
    if only:
        urls = batch["__url__"].tolist()
        keep &= np.array([url not in only or key in only[url] for key, url in zip(keys, urls)], dtype=bool)
    if fraction is not None:
        # Bernoulli by key hash: the same keys whatever the sharding or the number of actors.
        keep &= random_values(keys, seed + 1) < fraction
    hit = keep & np.array([k in excluded for k in keys], dtype=bool)
    if hit.any():
        _record(excluded_rows, [(keys[i], f"{shard_prefix}{batch['__url__'][i]}") for i in np.flatnonzero(hit)])
    keep &= ~hit
    return batch if keep.all() else {name: values[keep] for name, values in batch.items()}


def drop_excluded(batch: pa.Table, excluded: frozenset[str]) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Rows with ``key`` and ``shard`` -> (the rows whose key is not excluded, (key, shard) of the others)."""
    if not excluded:
        return batch, []
    hit = pa.array([k in excluded for k in batch.column("key").to_pylist()], pa.bool_())  # a null key is never excluded
    if not hit.true_count:
        return batch, []
    dropped = batch.filter(hit)
    return batch.filter(pa.compute.invert(hit)), list(
        zip(dropped.column("key").to_pylist(), dropped.column("shard").to_pylist())
    )


def store_prefilter(
    batch: pa.Table,
    current: Mapping[str, str],
    excluded: frozenset[str],
    fraction: float | None,
    seed: int,
    excluded_rows: Any = None,
) -> pa.Table:
    """Store rows -> current rows of the random subset, excluded ones dropped and recorded in
    `excluded_rows` (an :data:`ExcludedRows` actor, required when a row is excluded)."""
    batch = keep_current(batch, current)
    keys = batch.column("key").to_pylist()
    if fraction is not None:
        # The same Bernoulli-by-key-hash subset as on images; key-less error rows always stay.
        values = random_values([k if k is not None else "" for k in keys], seed + 1)
        keep = [k is None or v < fraction for k, v in zip(keys, values)]
        batch = batch.filter(pa.array(keep, pa.bool_()))
    batch, dropped = drop_excluded(batch, excluded)
    if dropped:
        _record(excluded_rows, dropped)
    return batch.drop_columns(["generation"])
