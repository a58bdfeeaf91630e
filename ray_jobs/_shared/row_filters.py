"""Row filters that run in Ray Data's read tasks ahead of decoding and scoring: the random subset,
shard-restricted reads and exclusions, for image rows and for feature-store rows.

Excluded rows are dropped here, before they cost any decoding or scoring, and recorded here: each
filter writes the (key, shard) of the rows it dropped as one small parquet part under the run's
attempt directory (:class:`DroppedParts`), with no round trip to anything; the driver reads the
parts once the pipeline is exhausted (the manifest counts them and lists them in excluded.parquet).
A part is named by its shard and a hash of its keys, so a task that Ray runs again (a retry, a
re-executed block) rewrites the same part; the driver keeps one row per key in any case
(:class:`ExcludedRowSet`), and pool keys are unique, so that is exactly one row per excluded sample.

Kept apart from `querying` on purpose: a task's function is imported by module in every
worker process that runs it, and querying pulls in torch (seconds per process), while
these need only numpy, pyarrow and fsspec. Many small read tasks start many worker processes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from pipeline.acquisition import random_values
from pipeline.proxy.store import keep_current
from pipeline.storage import filesystem_for, is_local, join_path

__all__ = ["DroppedParts", "ExcludedRowSet", "drop_excluded", "prefilter_raw", "store_prefilter"]

_DROPPED_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string())])


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


@dataclass(frozen=True)
class DroppedParts:
    """Where the read tasks write the (key, shard) of the rows they drop: one parquet part per
    block that dropped any, under `uri` (a folder of the run's attempt), read back by the driver.

    Picklable (a URI and options): it travels into every read task. A part's name is a hash of its
    shard and of its keys, so a task that runs again writes the same name and replaces its part.
    Written before the task returns its block, so once the pipeline is exhausted every part is there.
    """

    uri: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def write(self, rows: list[tuple[str, str]]) -> None:
        """Write one part holding `rows` (a block's dropped (key, shard) pairs, in its order)."""
        keys = [key for key, _ in rows]
        shards = sorted({shard for _, shard in rows})
        name = f"{_digest(shards)[:12]}-{_digest(keys)[:20]}.parquet"
        buffer = io.BytesIO()
        pq.write_table(pa.table({"key": keys, "shard": [s for _, s in rows]}, schema=_DROPPED_SCHEMA), buffer)
        fs, path = filesystem_for(self.uri, self.storage_options)
        if is_local(fs):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(join_path(path, name), buffer.getvalue())

    def read(self) -> list[tuple[str, str]]:
        """Every part's (key, shard) pairs, parts in name order (none written: an empty list)."""
        fs, path = filesystem_for(self.uri, self.storage_options)
        fs.invalidate_cache()  # an object store's listing may have been cached before the parts existed
        if not fs.exists(path):
            return []
        rows: list[tuple[str, str]] = []
        for part in sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")):
            table = pq.read_table(io.BytesIO(fs.cat_file(part)), schema=_DROPPED_SCHEMA)
            rows += zip(table.column("key").to_pylist(), table.column("shard").to_pylist())
        return rows


def _digest(values: list[str]) -> str:
    return hashlib.sha256("\0".join(values).encode()).hexdigest()


def _record(dropped_to: DroppedParts | None, rows: list[tuple[str, str]]) -> None:
    if dropped_to is None:
        raise ValueError("excluded rows were dropped with nowhere to record them: pass dropped_to (DroppedParts)")
    dropped_to.write(rows)


def prefilter_raw(
    batch: dict[str, np.ndarray],
    excluded: frozenset[str],
    fraction: float | None,
    seed: int,
    only: Mapping[str, frozenset[str]] | None = None,
    *,
    dropped_to: DroppedParts | None = None,
    shard_prefix: str = "",
) -> dict[str, np.ndarray]:
    """Raw rows -> raw rows: drop rows outside the random subset or, in the shards `only` names
    (by path), rows not among its keys; drop excluded rows and record them in `dropped_to`.

    Args:
        batch: Raw rows (``__key__``, ``__url__`` and the payload columns).
        excluded: Keys never to score.
        fraction: Keep about this fraction of the rows (by key hash); ``None`` keeps all.
        seed: Seed of the subset.
        only: Shard path -> the only keys to read from it.
        dropped_to: Where the excluded rows' (key, shard) go; required when a row is excluded.
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
        _record(dropped_to, [(keys[i], f"{shard_prefix}{batch['__url__'][i]}") for i in np.flatnonzero(hit)])
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
    dropped_to: DroppedParts | None = None,
) -> pa.Table:
    """Store rows -> current rows of the random subset, excluded ones dropped and recorded in
    `dropped_to` (required when a row is excluded)."""
    batch = keep_current(batch, current)
    keys = batch.column("key").to_pylist()
    if fraction is not None:
        # The same Bernoulli-by-key-hash subset as on images; key-less error rows always stay.
        values = random_values([k if k is not None else "" for k in keys], seed + 1)
        keep = [k is None or v < fraction for k, v in zip(keys, values)]
        batch = batch.filter(pa.array(keep, pa.bool_()))
    batch, dropped = drop_excluded(batch, excluded)
    if dropped:
        _record(dropped_to, dropped)
    return batch.drop_columns(["generation"])
