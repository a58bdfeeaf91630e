"""A pool build between its start and its index: the plan, and one record per finished partition.

While a build runs, the pool prefix holds::

    pool-000000.tar, pool-000001.tar, ...   shards of finished (and in-flight) partitions
    _build/plan.json                        settings, source identity, one fingerprint per partition
    _build/part-000000.json, ...            written by a partition's writer after its last shard closed
    index.json                              written last, by the driver; then _build/ is removed

A prefix without ``index.json`` is never a pool to readers (``resolve_pool`` names it an unfinished
build), so a half-built pool never looks complete. Running the same build again keeps every partition
whose record exists, whose fingerprint still matches the source and whose shards have the recorded
sizes, and writes only the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem

from pipeline.pools.errors import EmptyPoolError, PoolError, PoolExistsError
from pipeline.pools.format import BUILD_DIR, INDEX_NAME, PoolIndex, ShardEntry
from pipeline.pools.sources.base import ImageSource
from pipeline.pools.writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, image_encoding_of
from pipeline.storage import display_uri, filesystem_for, join_path, write_bytes_atomic

__all__ = [
    "BuildReport",
    "BuildSettings",
    "Partition",
    "PartitionRecord",
    "PartialBuildError",
    "PoolBuild",
    "record_path",
    "source_identity",
]

PLAN_NAME = "plan.json"
_PLAN_FORMAT = "lplgrad-pool-build"
# Provenance fields that count samples: a re-run over a grown folder (or a larger --synthetic N)
# is the same source with more partitions, not another source.
_COUNT_FIELDS = ("samples", "n")


@dataclass(frozen=True)
class BuildSettings:
    """Everything besides the source that decides a pool's bytes.

    Attributes:
        encoding: Image encoding (``png``, ``jpg``, ``webp``; ``None`` keeps pool formats).
        shard_samples: Samples per partition, and so at most per shard.
        shard_bytes: Target maximum shard size; a partition that exceeds it continues in
            another shard (``pool-000003_0001.tar``).
        classes: The class list recorded in the index.
        unlabeled: Drop ``cls`` members.
    """

    encoding: str | None = None
    shard_samples: int = DEFAULT_SHARD_SAMPLES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    classes: tuple[str, ...] | None = None
    unlabeled: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists for tuples), as stored in the plan."""
        doc = asdict(self)
        doc["classes"] = list(self.classes) if self.classes is not None else None
        return doc


@dataclass(frozen=True)
class Partition:
    """Samples ``start .. start+len-1`` of a source: the unit one task writes.

    Attributes:
        index: Position in the build; its first shard is ``shard_name(index)``.
        fingerprint: Identity of its samples (see ``PartitionedSource.fingerprint``).
        source: The samples, as a small picklable source.
    """

    index: int
    fingerprint: str
    source: ImageSource


@dataclass(frozen=True)
class PartitionRecord:
    """What a finished partition wrote (``_build/part-NNNNNN.json``).

    Attributes:
        index: The partition.
        fingerprint: The fingerprint of the samples it was written from.
        shards: Its shards, in order, with exact sizes.
        labeled: Every sample carries ``cls``.
        image_exts: Image extensions written.
    """

    index: int
    fingerprint: str
    shards: tuple[ShardEntry, ...]
    labeled: bool
    image_exts: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        """Samples over its shards."""
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        """The record as JSON."""
        doc = asdict(self)
        doc["shards"] = [asdict(s) for s in self.shards]
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> PartitionRecord:
        """Parse a record.

        Raises:
            PoolError: If it is not a partition record.
        """
        try:
            doc = json.loads(text)
            return cls(
                index=int(doc["index"]),
                fingerprint=str(doc["fingerprint"]),
                shards=tuple(ShardEntry(str(s["name"]), int(s["samples"]), int(s["bytes"])) for s in doc["shards"]),
                labeled=bool(doc["labeled"]),
                image_exts=tuple(str(e) for e in doc["image_exts"]),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise PoolError(f"{where} is not a partition record ({type(err).__name__}: {err}); delete it") from None


@dataclass(frozen=True)
class BuildReport:
    """How a build went.

    Attributes:
        index: The index written.
        partitions: Partitions in the pool.
        written: Partitions written by this run.
        kept: Partitions a previous run had finished, kept as they were.
    """

    index: PoolIndex
    partitions: int
    written: int
    kept: int


class PartialBuildError(PoolError, ValueError):
    """Some partitions failed; the others are kept and no index was written.

    Attributes:
        failures: ``(partition index, error)`` per failed partition.
    """

    def __init__(self, message: str, failures: Sequence[tuple[int, BaseException]]) -> None:
        super().__init__(message)
        self.failures = list(failures)

    def __reduce__(self) -> tuple[type, tuple[str, list[tuple[int, BaseException]]]]:
        return type(self), (str(self), self.failures)


def source_identity(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance without sample counts: what must match for a build to be resumed."""
    return {k: v for k, v in provenance.items() if k not in _COUNT_FIELDS}


def record_path(pool_path: str, index: int) -> str:
    """Stripped path of partition ``index``'s record under the pool path."""
    return join_path(pool_path, f"{BUILD_DIR}/part-{index:06d}.json")


class PoolBuild:
    """One build of one pool prefix: refuses what it must, says what is done, writes the index.

    Made by :meth:`start`; the caller writes the partitions :meth:`is_done` says are not done
    (serially or as Ray tasks), then calls :meth:`finish` with every partition's record.
    """

    def __init__(
        self,
        uri: str,
        fs: AbstractFileSystem,
        path: str,
        settings: BuildSettings,
        provenance: Mapping[str, Any],
        records: Mapping[int, PartitionRecord],
        sizes: Mapping[str, int],
    ) -> None:
        self.uri, self.fs, self.path = uri, fs, path
        self.settings = settings
        self.provenance = dict(provenance)
        self.records = dict(records)
        self._sizes = dict(sizes)

    @classmethod
    def start(
        cls,
        uri: str,
        settings: BuildSettings,
        provenance: Mapping[str, Any],
        fingerprints: Sequence[str] | None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> PoolBuild:
        """Check ``uri`` and record the plan: a new prefix, or an unfinished build of the same thing.

        Args:
            uri: The pool prefix.
            settings: The build settings.
            provenance: The source's provenance (recorded in the index).
            fingerprints: One per partition, or ``None`` when the source is a stream whose
                partitions are only known as it is read.
            storage_options: fsspec options for ``uri``.

        Returns:
            The build, with the records of the partitions a previous run finished.

        Raises:
            PoolExistsError: If ``uri`` holds a finished pool, shards no build of ours wrote, or an
                unfinished build with other settings or of another source.
        """
        fs, path = filesystem_for(uri, storage_options)
        fs.invalidate_cache()
        listing = fs.ls(path, detail=True) if fs.exists(path) else []
        names = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in listing}
        if INDEX_NAME in names:
            raise PoolExistsError(
                f"{uri} already holds a pool ({INDEX_NAME}: its build is complete); "
                "write to a new prefix or delete the old pool first"
            )
        plan_path = join_path(path, f"{BUILD_DIR}/{PLAN_NAME}")
        identity = source_identity(provenance)
        records: dict[int, PartitionRecord] = {}
        if BUILD_DIR in names and fs.exists(plan_path):
            _check_same_build(uri, json.loads(fs.cat_file(plan_path)), settings, identity)
            records = _read_records(fs, path)
        else:
            taken = sorted(n for n in names if n.endswith(".tar"))
            if taken:
                raise PoolExistsError(
                    f"{uri} already holds a pool ({', '.join(taken[:3])}, ...); "
                    "write to a new prefix or delete the old pool first"
                )
        plan = {
            "format": _PLAN_FORMAT,
            "version": 1,
            "settings": settings.to_dict(),
            "source": identity,
            "fingerprints": list(fingerprints) if fingerprints is not None else None,
        }
        write_bytes_atomic(fs, plan_path, json.dumps(plan, indent=1).encode())
        sizes = {n: int(e.get("size") or 0) for n, e in names.items() if n.endswith(".tar")}
        return cls(uri, fs, path, settings, provenance, records, sizes)

    def is_done(self, partition: Partition) -> bool:
        """Whether a previous run finished ``partition`` from the same samples, shards intact."""
        record = self.records.get(partition.index)
        return (
            record is not None
            and record.fingerprint == partition.fingerprint
            and all(self._sizes.get(s.name) == s.bytes for s in record.shards)
        )

    def failed(self, failures: Sequence[tuple[int, BaseException]], partitions: int) -> BaseException:
        """The error for a build whose partitions ``failures`` failed (no index is written).

        A user's problem (a corrupt image, a refused write: ``ValueError``, ``OSError``,
        ``PoolError``) becomes one :class:`PartialBuildError` naming every failure; anything else
        is a bug and is returned as it was raised, so its traceback survives.
        """
        failures = sorted(failures, key=lambda f: f[0])
        bugs = [e for _, e in failures if not isinstance(e, (ValueError, OSError, PoolError))]
        if bugs:
            return bugs[0]
        shown = "; ".join(f"partition {i}: {' '.join(str(e).split())}" for i, e in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        return PartialBuildError(
            f"{len(failures)} of {partitions} partitions of {self.uri} failed: {shown}{more}; no index was written "
            "and the other partitions are kept (fix the inputs and run the same command again: it resumes)",
            failures,
        )

    def finish(self, records: Mapping[int, PartitionRecord], written: int) -> BuildReport:
        """Write the index over every partition's shards, delete leftovers, remove ``_build/``.

        Args:
            records: Partition index -> record, for partitions ``0 .. n-1``.
            written: How many of them this run wrote.

        Returns:
            The report, with the index written.

        Raises:
            EmptyPoolError: If there are no partitions.
            PoolError: If a partition is missing.
        """
        if not records:
            self._remove_build_dir()
            raise EmptyPoolError(f"no samples were written to {self.uri}; the pool would be empty")
        missing = sorted(set(range(len(records))) - set(records))
        if missing:
            raise PoolError(f"partitions {missing[:5]} of {self.uri} have no record; run the build again")
        ordered = [records[i] for i in range(len(records))]
        shards = tuple(s for r in ordered for s in r.shards)
        index = PoolIndex(
            shards=shards,
            classes=self.settings.classes,
            labeled=all(r.labeled for r in ordered),
            image_encoding=image_encoding_of({e for r in ordered for e in r.image_exts}),
            source={**self.provenance, "encoding": self.settings.encoding, "unlabeled": self.settings.unlabeled},
        )
        # Shards of an earlier run that the final plan does not use (the source shrank, or a
        # partition now fits in fewer shards) would otherwise sit beside the pool forever.
        keep = {s.name for s in shards}
        self.fs.invalidate_cache()
        for entry in self.fs.ls(self.path, detail=False):
            if entry.endswith(".tar") and entry.rsplit("/", 1)[-1] not in keep:
                self.fs.rm(entry)
        write_bytes_atomic(self.fs, join_path(self.path, INDEX_NAME), index.to_json().encode())
        self._remove_build_dir()
        return BuildReport(index=index, partitions=len(ordered), written=written, kept=len(ordered) - written)

    def _remove_build_dir(self) -> None:
        build_dir = join_path(self.path, BUILD_DIR)
        self.fs.invalidate_cache()
        if self.fs.exists(build_dir):
            self.fs.rm(build_dir, recursive=True)


def _check_same_build(uri: str, plan: Mapping[str, Any], settings: BuildSettings, identity: Mapping[str, Any]) -> None:
    if plan.get("format") != _PLAN_FORMAT:
        raise PoolExistsError(f"{uri}/{BUILD_DIR}/{PLAN_NAME} is not a build plan; delete {uri} to start over")
    before = {**plan.get("settings", {}), **{f"source.{k}": v for k, v in plan.get("source", {}).items()}}
    now = {**settings.to_dict(), **{f"source.{k}": v for k, v in identity.items()}}
    keys = sorted(set(before) | set(now))
    diffs = [f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in keys if before.get(k) != now.get(k)]
    if diffs:
        raise PoolExistsError(
            f"{uri} holds an unfinished build of another source or with other settings ({'; '.join(diffs[:3])}); "
            "run the command it was started with to resume it, or delete the prefix (or write to a new one) "
            "to start over"
        )


def _read_records(fs: AbstractFileSystem, path: str) -> dict[int, PartitionRecord]:
    build_dir = join_path(path, BUILD_DIR)
    names = [
        p
        for p in fs.ls(build_dir, detail=False)
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".json")  # not a local temp file
    ]
    if not names:
        return {}
    texts = fs.cat(names, on_error="return") if len(names) > 1 else {names[0]: fs.cat_file(names[0])}
    records = {}
    for name, text in texts.items():
        if isinstance(text, BaseException):
            continue  # unreadable: that partition is written again
        record = PartitionRecord.from_json(text, display_uri(fs, name))
        records[record.index] = record
    return records
