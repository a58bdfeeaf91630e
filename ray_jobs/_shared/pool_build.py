"""Building a pool on Ray: one task per partition, each writing its own shards; the index last.

The library plans, resumes and writes the index (``pipeline.pools.build_partitioned``); this
module only runs ``pipeline.pools.write_partition`` as Ray tasks:

    from ray_jobs._shared.pool_build import RayPartitionWriter
    report = build_partitioned(source, "s3://bucket/pools/photos", settings, write=RayPartitionWriter())

Tasks reserve ``task_cpus`` (default 0.5): a partition's writer alternates between reading source
files, verifying or encoding images, and uploading its shard, so two per core keep the cores busy,
and on a laptop's local Ray the tasks still leave room for the driver and Ray's own processes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from pipeline.pools import BuildSettings, Partition, PartitionRecord, write_partition, write_partitions_serially
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.progress import Progress

__all__ = ["DEFAULT_TASK_CPUS", "RayPartitionWriter"]

DEFAULT_TASK_CPUS = 0.5


@ray.remote
def _write_partition_task(
    out_uri: str, partition: Partition, settings: BuildSettings, storage_options: Mapping[str, Any] | None
) -> PartitionRecord:
    return write_partition(out_uri, partition, settings, storage_options)


class RayPartitionWriter:
    """A ``PartitionWriter`` that runs each partition as a Ray task.

    With at most one partition left to write it writes in this process and never starts Ray
    (starting a local Ray costs more than one partition). ``executor`` records which path ran:
    ``"ray"`` or ``"process"``.

    Args:
        address: Ray cluster address; ``None`` joins ``RAY_ADDRESS`` or starts a local Ray
            (reusing this process's Ray when it already has one).
        task_cpus: CPUs each task reserves.
        progress: Print a line per finished partition (to stderr: stdout carries the summary).
    """

    def __init__(self, address: str | None = None, task_cpus: float = DEFAULT_TASK_CPUS, progress: bool = True) -> None:
        if task_cpus <= 0:
            raise ValueError(f"task_cpus must be positive, got {task_cpus}")
        self.address = address
        self.task_cpus = task_cpus
        self.progress = progress
        self.executor = "none"
        self.where = ""

    def __call__(
        self,
        out_uri: str,
        partitions: Sequence[Partition],
        settings: BuildSettings,
        storage_options: Mapping[str, Any] | None = None,
    ) -> list[PartitionRecord | BaseException]:
        if len(partitions) <= 1:
            self.executor = "process"
            return write_partitions_serially(out_uri, partitions, settings, storage_options)
        self.executor = "ray"
        self.where = connect(self.address)
        task = _write_partition_task.options(num_cpus=self.task_cpus)
        options = dict(storage_options) if storage_options is not None else None
        pending = {task.remote(out_uri, p, settings, options): i for i, p in enumerate(partitions)}
        results: list[PartitionRecord | BaseException | None] = [None] * len(partitions)
        progress = (
            Progress("pool build", len(partitions), "partitions", stream=sys.stderr, min_interval=2.0)
            if self.progress
            else None
        )
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    # The task's own exception (a corrupt image's ValueError), not Ray's wrapper;
                    # a lost worker stays a RayError and is reported as the bug it is.
                    cause = getattr(err, "cause", None)
                    results[i] = cause if isinstance(cause, BaseException) else err
                if progress is not None:
                    progress.update(1)
        except BaseException:
            for ref in pending:
                # Interrupted: a running writer gets KeyboardInterrupt and deletes its partial shards;
                # finished partitions stay, and the same command resumes from them.
                ray.cancel(ref)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [r for r in results if r is not None]
