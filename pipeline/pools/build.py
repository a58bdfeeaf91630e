"""Build a pool from a source: partitions of consecutive samples, each written to its own shards,
then the index, last.

The same partition writer runs serially here (:func:`build_pool`) and as Ray tasks in
``ray_jobs/_shared/pool_build.py``: partition ``i`` holds samples ``i*S .. (i+1)*S-1``
(``S = shard_samples``) and writes ``pool-{i:06d}.tar`` (plus ``pool-{i:06d}_0001.tar``, ...
when it exceeds ``shard_bytes``), so both give byte-identical shards and the same index (only its
``created`` time differs). See ``_build_state.py`` for resuming.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.pools._build_state import (
    BuildReport,
    BuildSettings,
    Partition,
    PartitionRecord,
    PoolBuild,
    record_path,
)
from pipeline.pools.encode import ENCODINGS, encode_image
from pipeline.pools.errors import DuplicateKeyError, EmptyPoolError
from pipeline.pools.format import IMAGE_EXTENSIONS, LABEL_EXTENSION, META_EXTENSION, PoolIndex, partition_shard_name
from pipeline.pools.sources.base import ImageSource, PartitionedSource, SourceSample
from pipeline.pools.writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, ShardSeriesWriter
from pipeline.storage import display_uri, filesystem_for, join_path, write_bytes_atomic

__all__ = [
    "PartitionWriter",
    "build_partitioned",
    "build_pool",
    "build_settings",
    "plan_partitions",
    "sample_files",
    "write_partition",
    "write_partitions_serially",
]

_SAME = {"jpg": {"jpg", "jpeg"}, "png": {"png"}, "webp": {"webp"}}

# Writes the given partitions (serially, or as Ray tasks) and returns, per partition in order,
# its record or the exception that stopped it.
PartitionWriter = Callable[
    [str, Sequence[Partition], BuildSettings, Mapping[str, Any] | None], list[PartitionRecord | BaseException]
]


def sample_files(sample: SourceSample, encoding: str | None = None, *, with_label: bool = True) -> dict[str, bytes]:
    """Turn a source sample into the files of a pool sample.

    Encoded images in a pool format pass through untouched unless another ``encoding`` is
    asked for (re-encoding JPEGs loses quality); arrays and other formats are encoded
    (PNG by default, lossless).

    Args:
        sample: The source sample.
        encoding: ``png``, ``jpg``, ``webp``, or ``None`` (keep, else PNG).
        with_label: Whether to store the label as ``cls``.

    Returns:
        Extension -> bytes (``png``/``jpg``/..., optional ``cls`` and ``json``).

    Raises:
        ValueError: On an unknown encoding.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if isinstance(sample.image, bytes):
        ext = (sample.image_ext or "").lower()
        keep = ext in IMAGE_EXTENSIONS and (encoding is None or ext in _SAME[encoding])
        if keep:
            files = {ext: sample.image}
        else:
            with Image.open(io.BytesIO(sample.image)) as img:
                img.load()
                target = encoding or "png"
                files = {target: encode_image(img, target)}
    else:
        target = encoding or "png"
        files = {target: encode_image(sample.image, target)}
    if with_label and sample.label is not None:
        files[LABEL_EXTENSION] = str(int(sample.label)).encode("ascii")
    if sample.meta is not None:
        files[META_EXTENSION] = json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()
    return files


def build_settings(
    source: ImageSource,
    *,
    encoding: str | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    class_names: Sequence[str] | None = None,
    unlabeled: bool = False,
) -> BuildSettings:
    """Check the build options against ``source`` and freeze them.

    Raises:
        ValueError: On a class list shorter than the source's, an unknown encoding, or
            non-positive shard limits.
    """
    if class_names is not None and source.classes is not None and len(class_names) < len(source.classes):
        raise ValueError(f"{len(class_names)} class names given but the source has {len(source.classes)} classes")
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if shard_samples <= 0 or shard_bytes <= 0:
        raise ValueError(f"shard_samples and shard_bytes must be positive, got {shard_samples}, {shard_bytes}")
    classes = tuple(class_names) if class_names is not None else source.classes
    return BuildSettings(encoding, shard_samples, shard_bytes, classes, unlabeled)


def plan_partitions(source: PartitionedSource, samples_per_partition: int) -> list[Partition]:
    """Cut ``source`` into partitions of ``samples_per_partition`` consecutive samples.

    Args:
        source: A source that hands out ranges (every built-in source does).
        samples_per_partition: The build's ``shard_samples``.

    Returns:
        The partitions, in source order (the last may be shorter).
    """
    n = len(source)
    return [
        Partition(
            index=i,
            fingerprint=source.fingerprint(start, min(start + samples_per_partition, n)),
            source=source.partition(start, min(start + samples_per_partition, n)),
        )
        for i, start in enumerate(range(0, n, samples_per_partition))
    ]


def write_partition(
    out_uri: str,
    partition: Partition,
    settings: BuildSettings,
    storage_options: Mapping[str, Any] | None = None,
) -> PartitionRecord:
    """Write one partition's shards, then its record (the proof that they are complete).

    Safe to run concurrently for different partitions of one pool, on any machine that reaches
    ``out_uri``; a failure deletes the shards it wrote and leaves no record.

    Args:
        out_uri: The pool prefix.
        partition: The partition.
        settings: The build settings.
        storage_options: fsspec options for ``out_uri``.

    Returns:
        The record written to ``_build/part-NNNNNN.json``.

    Raises:
        ValueError: On a sample that cannot be stored (a corrupt image, a label outside the classes).
        EmptyPoolError: If the partition holds no sample.
    """
    fs, path = filesystem_for(out_uri, storage_options)
    stale = record_path(path, partition.index)
    if fs.exists(stale):
        fs.rm(stale)  # an old record must not vouch for shards about to be rewritten
    series = ShardSeriesWriter(
        fs,
        path,
        functools.partial(partition_shard_name, partition.index),
        shard_samples=settings.shard_samples,
        shard_bytes=settings.shard_bytes,
    )
    classes = settings.classes
    try:
        for sample in partition.source:
            if sample.label is not None and classes is not None and not 0 <= sample.label < len(classes):
                raise ValueError(
                    f"sample {sample.key!r} has label {sample.label}, outside the class list ({len(classes)} classes)"
                )
            series.write(sample.key, sample_files(sample, settings.encoding, with_label=not settings.unlabeled))
        shards = series.finish()
    except BaseException:
        series.abort()
        raise
    if not shards:
        raise EmptyPoolError(f"partition {partition.index} of {out_uri} holds no samples")
    record = PartitionRecord(
        index=partition.index,
        fingerprint=partition.fingerprint,
        shards=tuple(shards),
        labeled=series.labeled,
        image_exts=tuple(sorted(series.image_exts)),
    )
    write_bytes_atomic(fs, stale, record.to_json().encode())
    return record


def write_partitions_serially(
    out_uri: str,
    partitions: Sequence[Partition],
    settings: BuildSettings,
    storage_options: Mapping[str, Any] | None = None,
) -> list[PartitionRecord | BaseException]:
    """The one-process :data:`PartitionWriter`: every partition in turn, going on after a failure."""
    results: list[PartitionRecord | BaseException] = []
    for partition in partitions:
        try:
            results.append(write_partition(out_uri, partition, settings, storage_options))
        except Exception as err:  # noqa: BLE001  (reported with every other failure by PoolBuild.failed)
            results.append(err)
    return results


def build_partitioned(
    source: PartitionedSource,
    out_uri: str,
    settings: BuildSettings,
    storage_options: Mapping[str, Any] | None = None,
    *,
    write: PartitionWriter = write_partitions_serially,
) -> BuildReport:
    """Plan, resume, write the partitions left with ``write``, and write the index last.

    Args:
        source: The source.
        out_uri: The pool prefix: new, or holding an unfinished build of the same source and settings.
        settings: From :func:`build_settings`.
        storage_options: fsspec options for ``out_uri``.
        write: Writes partitions: :func:`write_partitions_serially`, or Ray tasks.

    Returns:
        The report (index, partitions written and kept).

    Raises:
        PoolExistsError: See :meth:`PoolBuild.start`.
        PartialBuildError: If partitions failed (the others are kept; no index is written).
        EmptyPoolError: If the source is empty.
    """
    partitions = plan_partitions(source, settings.shard_samples)
    if not partitions:
        raise EmptyPoolError("the source holds no samples; the pool would be empty")
    build = PoolBuild.start(
        out_uri, settings, source.provenance(), [p.fingerprint for p in partitions], storage_options
    )
    records = {p.index: build.records[p.index] for p in partitions if build.is_done(p)}
    todo = [p for p in partitions if p.index not in records]
    failures = []
    for partition, result in zip(todo, write(out_uri, todo, settings, storage_options) if todo else []):
        if isinstance(result, BaseException):
            failures.append((partition.index, result))
        else:
            records[partition.index] = result
    if failures:
        raise build.failed(failures, len(partitions))
    return build.finish(records, written=len(todo))


def build_pool(
    source: ImageSource,
    out_uri: str,
    *,
    encoding: str | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    unlabeled: bool = False,
) -> PoolIndex:
    """Write every sample of ``source`` to a new pool at ``out_uri``, in this process (no Ray).

    Re-running it on the prefix of an interrupted or failed build resumes: finished partitions
    are kept, the rest written, and the index written last.

    Args:
        source: Any :class:`~pipeline.pools.sources.ImageSource`; sources that are not
            :class:`PartitionedSource` are cut into partitions as they stream.
        out_uri: New pool prefix (local or any fsspec URI), or the prefix of an unfinished build.
        encoding: Image encoding (see :func:`sample_files`).
        shard_samples: Maximum samples per shard (and per partition).
        shard_bytes: Target maximum bytes per shard.
        storage_options: fsspec options for ``out_uri``.
        class_names: Names replacing the source's class list (e.g. Fashion-MNIST's, which
            IDX files do not carry); must cover every label.
        unlabeled: Drop labels (a pool to be labeled by annotators); the class list is kept.

    Returns:
        The index written.

    Raises:
        ValueError: On a class list that does not cover the labels, or a bad sample.
        PoolExistsError: If ``out_uri`` already holds a pool (or another build).
        PartialBuildError: If partitions failed (a corrupt image, say): every failure is named.
        EmptyPoolError: If the source yields nothing.
    """
    settings = build_settings(
        source,
        encoding=encoding,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        class_names=class_names,
        unlabeled=unlabeled,
    )
    if isinstance(source, PartitionedSource):
        return build_partitioned(source, out_uri, settings, storage_options).index
    return _build_stream(source, out_uri, settings, storage_options).index


class _Chunk:
    """A stream's consecutive samples held in memory: a partition of a source that cannot slice."""

    classes = None

    def __init__(self, samples: list[SourceSample]) -> None:
        self.samples = samples

    def provenance(self) -> dict[str, Any]:
        return {"kind": "chunk", "samples": len(self.samples)}

    def __iter__(self) -> Iterator[SourceSample]:
        return iter(self.samples)


def _chunk_fingerprint(samples: list[SourceSample]) -> str:
    # Content, not metadata: a stream has nothing cheaper that identifies its samples.
    h = hashlib.sha256()
    for sample in samples:
        image = sample.image if isinstance(sample.image, bytes) else np.ascontiguousarray(sample.image)
        shape = "bytes" if isinstance(image, bytes) else f"{image.dtype}{image.shape}"
        meta = json.dumps(sample.meta, sort_keys=True)
        h.update(f"{sample.key}\t{sample.image_ext}\t{sample.label}\t{meta}\t{shape}\t{len(image)}\n".encode())
        h.update(image if isinstance(image, bytes) else image.tobytes())
    return h.hexdigest()


def _build_stream(
    source: ImageSource, out_uri: str, settings: BuildSettings, storage_options: Mapping[str, Any] | None
) -> BuildReport:
    build = PoolBuild.start(out_uri, settings, source.provenance(), None, storage_options)
    records: dict[int, PartitionRecord] = {}
    seen: dict[str, int] = {}
    written = 0
    chunk: list[SourceSample] = []

    def flush(index: int) -> None:
        nonlocal written
        partition = Partition(index, _chunk_fingerprint(chunk), _Chunk(list(chunk)))
        if build.is_done(partition):
            records[index] = build.records[index]
        else:
            records[index] = write_partition(out_uri, partition, settings, storage_options)
            written += 1
        chunk.clear()

    for sample in source:
        if sample.key in seen:

            def shard(i: int) -> str:
                return display_uri(build.fs, join_path(build.path, partition_shard_name(i, 0)))

            raise DuplicateKeyError(sample.key, shard(seen[sample.key]), shard(len(records)))
        seen[sample.key] = len(records)
        chunk.append(sample)
        if len(chunk) == settings.shard_samples:
            flush(len(records))
    if chunk:
        flush(len(records))
    return build.finish(records, written=written)
