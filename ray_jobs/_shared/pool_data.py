"""Ray Data over pools: read shards, decode in CPU tasks, labeled pools as Ray Train datasets.

Pipeline: ``resolve_pool`` + ``check_pool`` on the driver (fail fast, every bad shard
named) -> ``ray.data.read_webdataset(decoder=None)``, so payload bytes stay bytes and
nothing is unpickled -> ``decode`` as ``map_batches`` CPU tasks -> rows
``key, shard, image [C, H, W] float32, label (-1 if none), error (None or reason), meta``. The raw
read's ``__key__`` (Ray Data's name) becomes ``key`` in decoding, once: every later stage, the
scores table and the manifest call it ``key``.
A sample that fails to decode is an error row; it flows to the end of the job to be counted.

Storage goes through the same fsspec filesystem as the library (``arrow_filesystem``): a
read that fails mid-shard is retried from the same offset on a fresh handle, and a shard
still failing raises an error naming it.

CPU accounting: read tasks reserve ``read_num_cpus=0.5`` (they alternate between waiting on
storage and parsing tar headers), decode tasks ``decode_num_cpus=1`` (pure CPU work: reserving
less oversubscribes the cores and halved throughput on a 2-core machine, see
``benchmarks/bench_read.py``). Lower both when scoring actors hold most of the CPUs, so reads
can still be scheduled beside them. The query reads and decodes in one task per shard instead
(``read_num_cpus == decode_num_cpus``, ``concurrency``, ``block_rows``): a worker process per
task at once costs its imports, and small blocks let scoring start on a shard's first rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
from ray.data import Dataset, FileShuffleConfig
from ray.data.expressions import col
from ray.data.extensions import ArrowTensorArray

from pipeline.pools import (
    CheckMode,
    DecodeSpec,
    PoolError,
    ShardReadError,
    check_pool,
    decode_batch,
    resolve_pool,
    spec_for_model,
)
from pipeline.storage import DEFAULT_ATTEMPTS, arrow_filesystem, uri_prefix

__all__ = [
    "RawPool",
    "decode",
    "error_mask",
    "labeled_training_data",
    "read_pool",
    "read_pool_raw",
]

BadShardPolicy = Literal["raise", "error_row"]


@dataclass(frozen=True)
class RawPool:
    """A checked pool opened for reading, payloads still bytes.

    Attributes:
        dataset: ``read_webdataset`` over the good shards (``None`` if no shard is good).
            Rows hold ``__key__``, ``__url__`` (the protocol-stripped shard path) and one
            bytes column per member extension.
        bad_shards: ``(shard URI, reason)`` for shards that failed the check.
        shard_prefix: Prepended to ``__url__`` gives the shard URI (``"s3://"``, or ``""`` locally).
        classes: The pool's class list, when its index has one.
    """

    dataset: Dataset | None
    bad_shards: tuple[tuple[str, str], ...]
    shard_prefix: str
    classes: tuple[str, ...] | None


def read_pool_raw(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    check: CheckMode = "auto",
    on_bad_shard: BadShardPolicy = "raise",
    shuffle_seed: int | None = None,
    read_num_cpus: float = 0.5,
    attempts: int = DEFAULT_ATTEMPTS,
    override_num_blocks: int | None = None,
    shards: Sequence[str] | None = None,
    concurrency: int | None = None,
    task_per_shard: bool = False,
) -> RawPool:
    """Check a pool and open its good shards with ``read_webdataset``, bytes undecoded.

    Args:
        uri: Pool prefix, index, brace pattern or glob (see ``resolve_pool``).
        storage_options: fsspec options (S3 endpoint, credentials, ...).
        check: Pre-read check (``auto``: size/end-marker for indexed pools, a full header
            walk for pools made by other tools).
        on_bad_shard: ``raise``: any bad shard fails here, all named; ``error_row``: bad
            shards are returned for the caller to turn into error rows.
        shuffle_seed: Shuffle the shard order with this seed (per execution).
        read_num_cpus: CPUs reserved per read task.
        attempts: Tries per storage operation.
        override_num_blocks: Passed to ``read_webdataset``.
        shards: Read only these shards of the pool (``ShardRef.uri`` values); ``None``: all.
        concurrency: At most this many read tasks at once (``None``: as many as resources allow).
        task_per_shard: One read task per shard, its output cut into blocks by the dataset's
            ``target_max_block_size`` (instead of Ray's split of each task's output, which keeps a
            read from fusing with the stages after it).

    Returns:
        The :class:`RawPool`.

    Raises:
        ShardReadError: With ``on_bad_shard="raise"``, listing every bad shard and why.
        PoolNotFoundError, EmptyPoolError, DuplicateKeyError: From resolving/checking the pool.
        ValueError: If ``shards`` is empty or names a shard the pool does not have.
    """
    pool = resolve_pool(uri, storage_options, attempts=attempts)
    if shards is not None:
        wanted = set(shards)
        unknown = sorted(wanted - {s.uri for s in pool.shards})
        if unknown or not wanted:
            raise ValueError(f"shards must be a non-empty subset of the shards of {uri}; not in it: {unknown[:5]}")
        pool = dataclasses.replace(pool, shards=tuple(s for s in pool.shards if s.uri in wanted))
    result = check_pool(pool, mode=check, attempts=attempts)
    problems = list(result.problems)
    if problems and on_bad_shard == "raise":
        raise ShardReadError(problems)
    raw = None
    if result.good:
        raw = ray.data.read_webdataset(
            [s.path for s in result.good],
            filesystem=arrow_filesystem(pool.fs, attempts, error=ShardReadError),
            decoder=None,  # keep payloads as bytes: the library decides what is safe to decode
            num_cpus=read_num_cpus,
            shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None,
            override_num_blocks=len(result.good) if task_per_shard else override_num_blocks,
            concurrency=concurrency,
        )
    return RawPool(raw, tuple(problems), uri_prefix(pool.fs), pool.classes)


def _decode_to_arrow(batch: dict[str, np.ndarray], spec: DecodeSpec, shard_prefix: str) -> pa.Table:
    # An explicit schema: a batch without errors would otherwise type "error" as null, which
    # Ray hands back as float NaN, not None.
    cols = decode_batch(batch, spec, shard_prefix=shard_prefix)
    return pa.table(
        {
            "key": pa.array(cols["key"], type=pa.string()),
            "shard": pa.array(cols["shard"], type=pa.string()),
            "image": ArrowTensorArray.from_numpy(cols["image"]),
            "label": pa.array(cols["label"], type=pa.int64()),
            "error": pa.array(cols["error"], type=pa.string()),
            "meta": pa.array(cols["meta"], type=pa.string()),
        }
    )


def decode(
    raw: Dataset,
    spec: DecodeSpec,
    *,
    shard_prefix: str = "",
    num_cpus: float = 1.0,
    batch_size: int | None = 256,
    concurrency: int | None = None,
) -> Dataset:
    """Decode raw pool rows into model inputs with ``map_batches`` CPU tasks.

    Args:
        raw: ``RawPool.dataset`` from :func:`read_pool_raw`.
        spec: Target shape, normalisation and class count.
        shard_prefix: ``RawPool.shard_prefix``: turns ``__url__`` into a shard URI.
        num_cpus: CPUs reserved per decode task.
        batch_size: Samples per decode call (``None``: a block per call).
        concurrency: At most this many decode tasks at once (``None``: as many as resources allow).

    Returns:
        Rows ``key`` (string), ``shard`` (string), ``image`` (float32 tensor ``[C, H, W]``),
        ``label`` (int64, -1 when absent), ``error`` (string, null when the row is good),
        ``meta`` (string or null); see ``pipeline.pools.decode_batch``.
    """
    return raw.map_batches(
        _decode_to_arrow,
        fn_kwargs={"spec": spec, "shard_prefix": shard_prefix},
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )


def error_mask(errors: Sequence[Any]) -> np.ndarray:
    """Return a bool mask of error rows from a batch's ``error`` column.

    Args:
        errors: The column (strings and None; NaN also counts as no error, which is what
            Ray gives for an all-null column typed by inference).

    Returns:
        ``True`` where the row is an error row.
    """
    return np.array([isinstance(e, str) for e in errors], dtype=bool)


def _shard_error_rows(problems: Sequence[tuple[str, str]], spec: DecodeSpec) -> Dataset:
    rows = [
        {
            "key": None,
            "shard": shard,
            "image": np.zeros(spec.shape, np.float32),
            "label": -1,
            "error": f"shard unreadable: {reason}",
            "meta": None,
        }
        for shard, reason in problems
    ]
    return ray.data.from_items(rows)


def read_pool(
    uri: str,
    spec: DecodeSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    check: CheckMode = "auto",
    on_bad_shard: BadShardPolicy = "raise",
    shuffle_seed: int | None = None,
    read_num_cpus: float = 0.5,
    decode_num_cpus: float = 1.0,
    batch_size: int = 256,
    attempts: int = DEFAULT_ATTEMPTS,
    prefilter: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    shards: Sequence[str] | None = None,
    concurrency: int | None = None,
    block_rows: int | None = None,
) -> Dataset:
    """Read and decode a pool: the dataset later jobs score or train on.

    If ``spec.num_classes`` is unset and the pool's index has a class list, labels outside
    it become error rows.

    Args:
        uri: Pool location (see :func:`read_pool_raw`).
        spec: Target shape and normalisation (e.g. ``spec_for_model("small_cnn")``).
        storage_options: fsspec options.
        check: Pre-read check mode.
        on_bad_shard: ``raise`` (default) or ``error_row``: one error row per bad shard
            (``key`` None, ``shard`` its URI, ``error`` the reason).
        shuffle_seed: Shuffle the shard order.
        read_num_cpus: CPUs per read task.
        decode_num_cpus: CPUs per decode task.
        batch_size: Samples per decode call.
        attempts: Tries per storage operation.
        prefilter: Applied to raw (undecoded) batches before decoding, in the same task: the
            query job drops rows outside a random subset and excluded rows there, so
            that they cost no decoding.
        shards: Read only these shards (see :func:`read_pool_raw`).
        concurrency: At most this many read and decode tasks at once (``None``: as many as
            resources allow; each is a worker process that imports the decoder first). With
            ``read_num_cpus == decode_num_cpus``, Ray Data runs read, prefilter and decode as one
            task per shard.
        block_rows: About this many decoded rows per output block (``None``: Ray's block size,
            128 MiB, which holds a whole 28x28 shard): a task hands its first rows downstream
            while it decodes the rest, so scoring starts early and overlaps decoding. With it,
            the prefilter and the decoder take a block per call (`batch_size` is not used), so
            that they fuse with the read.

    Returns:
        Rows ``key, shard, image, label, error, meta``.

    Raises:
        ShardReadError, PoolNotFoundError, EmptyPoolError, DuplicateKeyError: See
        :func:`read_pool_raw`.
    """
    raw = read_pool_raw(
        uri,
        storage_options=storage_options,
        check=check,
        on_bad_shard=on_bad_shard,
        shuffle_seed=shuffle_seed,
        read_num_cpus=read_num_cpus,
        attempts=attempts,
        shards=shards,
        concurrency=concurrency,
        task_per_shard=block_rows is not None,
    )
    if spec.num_classes is None and raw.classes is not None:
        spec = dataclasses.replace(spec, num_classes=len(raw.classes))
    parts = []
    if raw.dataset is not None:
        dataset = raw.dataset
        # Streaming blocks: a block per call, as a batch size would keep the read from fusing with the
        # stages after it (Ray Data does not fuse a read into a map that regroups rows).
        batch_size = None if block_rows is not None else batch_size
        if block_rows is not None:  # the dataset's own context (a copy): every stage built on it
            row_bytes = 4 * int(np.prod(spec.shape)) + 256  # float32 image plus key, shard and columns
            current = dataset.context.target_max_block_size or block_rows * row_bytes
            dataset.context.target_max_block_size = min(current, block_rows * row_bytes)
        if prefilter is not None:
            dataset = dataset.map_batches(
                prefilter,
                batch_format="numpy",
                batch_size=batch_size,
                num_cpus=read_num_cpus,
                compute=ray.data.TaskPoolStrategy(size=concurrency),
            )
        parts.append(
            decode(
                dataset,
                spec,
                shard_prefix=raw.shard_prefix,
                num_cpus=decode_num_cpus,
                batch_size=batch_size,
                concurrency=concurrency,
            )
        )
    if raw.bad_shards:
        parts.append(_shard_error_rows(raw.bad_shards, spec))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _error_rows(ds: Dataset, keep: int = 20) -> tuple[int, list[tuple[str | None, str | None, str]]]:
    """(how many error rows, (key, shard, reason) of the first `keep`) of a decoded dataset."""
    count, examples = 0, []
    for batch in ds.select_columns(["key", "shard", "error"]).iter_batches(batch_size=4096, batch_format="numpy"):
        for i in np.flatnonzero(error_mask(batch["error"])):
            count += 1
            if len(examples) < keep:
                examples.append((batch["key"][i], batch["shard"][i], str(batch["error"][i])))
    return count, examples


def labeled_training_data(
    labeled: str,
    holdout: str | None,
    model: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    errors: Literal["drop", "raise"] = "drop",
    in_channels: int | None = None,
) -> tuple[dict[str, Dataset], list[str]]:
    """Decoded ``{"train": ..., "holdout": ...}`` datasets of ``image``/``label`` rows for Ray Train.

    Error rows are found by one decode pass over each set before training (labeled sets are
    small), reported on stdout with their keys and shards, and then dropped (``errors="drop"``)
    or turned into an error listing them (``errors="raise"``): training never sees label -1.

    Args:
        labeled: The labeled pool (from ``lplgrad pool label``); its index carries the class list.
        holdout: Optional labeled pool for evaluation, with the same class list.
        model: Registered model name: decoding follows its input spec.
        storage_options: fsspec options for both pools.
        errors: What to do about error rows (see above).
        in_channels: The model's input channels when not its default.

    Returns:
        ``(datasets, classes)``; ``datasets`` has ``"train"`` and, with a holdout, ``"holdout"``.

    Raises:
        PoolError: A pool without a class list, or class lists that differ.
        ValueError: Error rows with ``errors="raise"``.
    """
    uris = {"train": labeled, **({"holdout": holdout} if holdout else {})}
    classes = None
    for name, uri in uris.items():
        pool_classes = resolve_pool(uri, storage_options).classes
        if pool_classes is None:
            raise PoolError(f"the {name} pool {uri} has no class list: build it with lplgrad pool label")
        if classes is not None and list(pool_classes) != classes:
            raise PoolError(f"class lists differ: {labeled} has {classes}, {uri} has {list(pool_classes)}")
        classes = list(pool_classes)
    assert classes is not None
    spec = spec_for_model(model, in_channels=in_channels, num_classes=len(classes))
    datasets = {}
    for name, uri in uris.items():
        # Decoded once: the error report and every epoch then read the materialised blocks.
        ds = read_pool(uri, spec, storage_options=storage_options).materialize()
        count, examples = _error_rows(ds)
        if count:
            lines = "\n".join(f"  {key} in {shard}: {reason}" for key, shard, reason in examples)
            message = f"{count} sample(s) of the {name} set {uri} cannot be used:\n{lines}"
            if errors == "raise":
                raise ValueError(message)
            print(f"warning: {message}\n  (dropped from training)", flush=True)
        datasets[name] = ds.filter(expr=col("error").is_null()).select_columns(["image", "label"])
    return datasets, classes
