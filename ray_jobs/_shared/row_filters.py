"""Row filters that run in Ray Data's read and decode tasks ahead of scoring: the random subset,
shard-restricted reads and exclusion marking, for image rows and for feature-store rows.

Kept apart from `ray_jobs.query` on purpose: a task's function is imported by module in every
worker process that runs it, and the query module pulls in torch (seconds per process), while
these need only numpy and pyarrow. Many small read tasks start many worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline.acquisition import random_values
from pipeline.proxy.store import keep_current

__all__ = ["EXCLUDED", "IMAGE_COLUMNS", "mark_excluded", "prefilter_raw", "store_prefilter"]

# Excluded rows travel as marked, unscored rows so that the driver can count them: their image
# bytes are dropped before decoding (decoding then fails cheaply) and the error is replaced by this
# marker after it. They are written neither to the scores table nor to errors.
EXCLUDED = "__excluded__"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")


def prefilter_raw(batch: dict[str, np.ndarray], excluded: frozenset[str], fraction: float | None, seed: int,
                  only: Mapping[str, frozenset[str]] | None = None) -> dict[str, np.ndarray]:
    """Raw rows -> raw rows: drop rows outside the random subset or, in the shards `only` names
    (by path), rows not among its keys; blank excluded rows' images."""
    keys = batch["__key__"].tolist()
    if only:
        urls = batch["__url__"].tolist()
        keep = np.array([url not in only or key in only[url] for key, url in zip(keys, urls)], dtype=bool)
        batch = {name: values[keep] for name, values in batch.items()}
        keys = [k for k, kept in zip(keys, keep) if kept]
    if fraction is not None:
        # Bernoulli by key hash: the same keys whatever the sharding or the number of actors.
        keep = random_values(keys, seed + 1) < fraction
        batch = {name: values[keep] for name, values in batch.items()}
        keys = [k for k, kept in zip(keys, keep) if kept]
    hit = np.array([k in excluded for k in keys], dtype=bool)
    if hit.any():
        for name in IMAGE_COLUMNS:
            if name in batch:
                column = batch[name].copy()
                column[hit] = None
                batch[name] = column
    return batch


def mark_excluded(batch: pa.Table, excluded: frozenset[str]) -> pa.Table:
    """Decoded or stored rows -> the same rows, with the error of excluded keys set to EXCLUDED."""
    hit = [k in excluded for k in batch.column("key").to_pylist()]
    errors = [EXCLUDED if h else e for h, e in zip(hit, batch.column("error").to_pylist())]
    return batch.set_column(batch.column_names.index("error"), "error", pa.array(errors, pa.string()))


def store_prefilter(batch: pa.Table, current: Mapping[str, str], excluded: frozenset[str], fraction: float | None,
                    seed: int) -> pa.Table:
    """Store rows -> current rows of the random subset, excluded ones marked (they are not scored)."""
    batch = keep_current(batch, current)
    keys = batch.column("key").to_pylist()
    if fraction is not None:
        # The same Bernoulli-by-key-hash subset as on images; key-less error rows always stay.
        values = random_values([k if k is not None else "" for k in keys], seed + 1)
        keep = [k is None or v < fraction for k, v in zip(keys, values)]
        batch = batch.filter(pa.array(keep, pa.bool_()))
    if excluded:
        batch = mark_excluded(batch, excluded)
    return batch.drop_columns(["generation"])
