"""Iterating a decoded labeled pool without Ray Train: one streaming iterator per worker and
shuffled (images, labels) tensor batches. The jobs train through Ray Train
(`ray_jobs._shared.pool_data.labeled_training_data`); these helpers let the pool tests check that
what `read_pool` gives splits, shuffles and carries labels as a training loop needs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from ray.data import DataIterator, Dataset, RandomSeedConfig

from ray_jobs._shared.pool_data import error_mask


def split_for_workers(ds: Dataset, num_workers: int, *, seed: int | None = None) -> list[DataIterator]:
    """Split a decoded labeled pool into one streaming iterator per training worker.

    Block order is randomised per execution (reproducibly from ``seed``), so each epoch
    sees a new order; iterators get equal row counts (a few rows may be dropped) so every
    worker runs the same number of steps. Consume all iterators concurrently (one per
    worker); with Ray Train pass ``datasets={"train": ds}`` and call
    ``ray.train.get_dataset_shard("train")`` in the worker instead.

    Args:
        ds: From `read_pool`.
        num_workers: Number of iterators.
        seed: Seed of the block-order shuffle.

    Returns:
        ``num_workers`` iterators over disjoint parts of ``ds``.
    """
    shuffled = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return shuffled.streaming_split(num_workers, equal=True)


@dataclass
class ErrorTally:
    """Error rows seen while iterating: counted, with the first few kept for the report.

    Attributes:
        count: Error rows seen.
        examples: ``(key, shard, reason)`` of the first ``keep`` error rows.
        keep: How many examples to keep.
    """

    count: int = 0
    examples: list[tuple[str | None, str | None, str]] = field(default_factory=list)
    keep: int = 20

    def add(self, key: str | None, shard: str | None, reason: str) -> None:
        """Record one error row."""
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append((key, shard, reason))


def iter_labeled_batches(
    data: Dataset | DataIterator,
    batch_size: int,
    *,
    shuffle_buffer: int = 2048,
    seed: int | None = None,
    drop_last: bool = False,
    errors: ErrorTally | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield shuffled ``(images [B, C, H, W], labels [B])`` from a decoded labeled pool.

    Rows are shuffled in a local buffer of ``shuffle_buffer`` rows (on top of the block
    order shuffle of :func:`split_for_workers`); pass ``seed=base + epoch`` to reshuffle
    per epoch reproducibly. Error rows are skipped and counted in ``errors``, so a batch can
    be a few rows short of ``batch_size``.

    Args:
        data: A decoded dataset or a worker's iterator (``streaming_split`` / Ray Train shard).
        batch_size: Rows per batch before error rows are removed.
        shuffle_buffer: Local shuffle buffer size in rows (0 disables shuffling).
        seed: Local shuffle seed.
        drop_last: Drop a final partial batch.
        errors: Tally to record error rows in.

    Yields:
        ``(float32 images, int64 labels)`` CPU tensors.

    Raises:
        ValueError: If a decoded row has no label (the pool is not a labeled set).
    """
    tally = errors if errors is not None else ErrorTally()
    batches = data.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seed,
    )
    for batch in batches:
        ok = ~error_mask(batch["error"])
        for i in np.flatnonzero(~ok):
            tally.add(batch["key"][i], batch["shard"][i], str(batch["error"][i]))
        labels = batch["label"][ok]
        if (labels < 0).any():
            key = batch["key"][ok][int(np.argmax(labels < 0))]
            raise ValueError(f"sample {key!r} has no label: train on a labeled set (lplgrad pool label)")
        if ok.any():
            yield torch.from_numpy(np.ascontiguousarray(batch["image"][ok])), torch.from_numpy(labels)
