"""Write a pool: deterministic WebDataset shards, then ``index.json`` last.

The bytes ``tarfile.open(mode="w|", format=PAX_FORMAT)`` writes, in the layout webdataset's
``TarWriter`` produces (one member per ``<key>.<ext>``), without importing webdataset (which imports
torch: a second of start-up in every task that writes). Member headers of short ASCII names are
patched from one header ``tarfile`` made (name, size, checksum): ``TarInfo.tobuf`` per member was
half the CPU time of a build of small images; other names go through ``tarfile`` itself.

Determinism: members carry mtime 0, uid/gid 0, no owner names and mode 0444, a sample's
members are written in sorted extension order, and shards rotate at fixed sample/byte thresholds, so
the same samples in the same order give byte-identical shards (only the index's
``created`` time differs between two builds).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, BinaryIO

from fsspec import AbstractFileSystem

from pipeline.pools.errors import DuplicateKeyError, EmptyPoolError, PoolError, PoolExistsError
from pipeline.pools.format import (
    BUILD_DIR,
    IMAGE_EXTENSIONS,
    INDEX_NAME,
    LABEL_EXTENSION,
    PoolIndex,
    ShardEntry,
    shard_name,
    validate_key,
)
from pipeline.storage import (
    display_uri,
    filesystem_for,
    is_local,
    join_path,
    write_bytes_atomic,
)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_SAMPLES",
    "PoolWriter",
    "ShardSeriesWriter",
    "image_encoding_of",
    "member_header",
]

DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 256 * 2**20  # 100 MB - 1 GB shards keep object-store reads efficient
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to whole 10 KiB records
_MEMBER_MODE = 0o444


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, _MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tarfile_header(name: str, size: int) -> bytes:
    return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("x", 0)
assert len(_TEMPLATE) == _BLOCK


def member_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for member ``name`` of ``size`` bytes (mtime 0, mode 0444, ...).

    Args:
        name: Member name.
        size: Payload size in bytes.

    Returns:
        One 512-byte ustar block, or PAX extended headers plus the block for long or non-ASCII names.
    """
    if not (name.isascii() and len(name) <= 100 and size < 8**11):
        return _tarfile_header(name, size)
    header = bytearray(_TEMPLATE)
    header[0:100] = name.encode("ascii").ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum is summed over its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _member_bytes(payload: int) -> int:
    """Tar bytes for one member: a header block plus the payload rounded up to blocks."""
    return _BLOCK + -(-payload // _BLOCK) * _BLOCK


class _CountingFile:
    """Pass-through writer that counts bytes, so the index needs no extra HEAD request."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.count = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class ShardSeriesWriter:
    """Write samples into a series of rotating shards named by ``name_for(0)``, ``name_for(1)``, ...

    The shard mechanics shared by :class:`PoolWriter` (one series per pool) and the partition
    writer of a parallel build (one series per partition): validation, rotation at fixed
    thresholds, deterministic members, duplicate keys. It writes no index and refuses nothing
    that is already there; its owner decides both.

    Args:
        fs: Filesystem of the pool.
        path: Stripped path of the pool prefix.
        name_for: Shard number within the series -> file name under ``path``.
        shard_samples: Maximum samples per shard.
        shard_bytes: Target maximum shard size; exceeded only by a single oversized sample.

    Raises:
        ValueError: If a shard limit is not positive.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        path: str,
        name_for: Callable[[int], str],
        *,
        shard_samples: int = DEFAULT_SHARD_SAMPLES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        if shard_samples <= 0 or shard_bytes <= 0:
            raise ValueError(f"shard_samples and shard_bytes must be positive, got {shard_samples}, {shard_bytes}")
        self.fs, self.path, self.name_for = fs, path, name_for
        self.shard_samples = shard_samples
        self.shard_bytes = shard_bytes
        self.entries: list[ShardEntry] = []
        self.image_exts: set[str] = set()
        self.labeled = True
        self._key_shard: dict[str, int] = {}
        self._file: BinaryIO | None = None
        self._counter: _CountingFile | None = None
        self._open = False
        self._count = 0
        self._estimate = 0
        self._closed = False

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return len(self._key_shard)

    def _shard_uri(self, i: int) -> str:
        return display_uri(self.fs, join_path(self.path, self.name_for(i)))

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        """Append one sample.

        Args:
            key: The sample's ``__key__`` (see :func:`~pipeline.pools.format.validate_key`).
            files: Extension -> payload, e.g. ``{"png": b"...", "cls": b"3"}``.

        Raises:
            ValueError: On an invalid key, no files, or non-bytes payloads.
            DuplicateKeyError: If ``key`` was already written to this series.
        """
        if self._closed:
            raise PoolError(f"writer for {display_uri(self.fs, self.path)} is closed")
        validate_key(key)
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        for ext, payload in files.items():
            if not ext or "/" in ext or ext.startswith("_"):
                raise ValueError(f"sample {key!r}: invalid extension {ext!r}")
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {key!r}: {ext} is {type(payload).__name__}, not bytes")
        size = sum(_member_bytes(len(p)) for p in files.values())
        full = self._count >= self.shard_samples or self._estimate + size > self.shard_bytes
        if not self._open or (self._count > 0 and full):
            self._next_shard()
        shard = len(self.entries)
        if key in self._key_shard:
            raise DuplicateKeyError(key, self._shard_uri(self._key_shard[key]), self._shard_uri(shard))
        self._key_shard[key] = shard
        assert self._counter is not None
        for ext in sorted(files):
            payload = bytes(files[ext])
            self._counter.write(member_header(f"{key}.{ext}", len(payload)))
            self._counter.write(payload)
            if len(payload) % _BLOCK:
                self._counter.write(bytes(_BLOCK - len(payload) % _BLOCK))
        self._count += 1
        self._estimate += size
        self.image_exts.update(e for e in files if e in IMAGE_EXTENSIONS)
        self.labeled &= LABEL_EXTENSION in files

    def _next_shard(self) -> None:
        self._finish_shard()
        path = join_path(self.path, self.name_for(len(self.entries)))
        if is_local(self.fs):
            self.fs.makedirs(self.path, exist_ok=True)  # object stores have no directories to make
        self._file = self.fs.open(path, mode="wb")
        # Written front to back, no seeks, as object-store uploads require.
        self._counter = _CountingFile(self._file)
        self._open = True
        self._count = 0
        self._estimate = 2 * _BLOCK  # the end-of-archive marker

    def _finish_shard(self) -> None:
        if not self._open:
            return
        assert self._file is not None and self._counter is not None
        self._counter.write(bytes(2 * _BLOCK))  # end-of-archive marker, then padding to whole records
        if self._counter.count % _RECORD:
            self._counter.write(bytes(_RECORD - self._counter.count % _RECORD))
        self._file.close()  # for object stores this completes the upload
        name = self.name_for(len(self.entries))
        self.entries.append(ShardEntry(name=name, samples=self._count, bytes=self._counter.count))
        self._file = self._counter = None
        self._open = False

    def finish(self) -> list[ShardEntry]:
        """Close the last shard; every shard is complete on storage when this returns.

        Returns:
            The shards written, in order (empty when no sample was written).
        """
        if self._closed:
            raise PoolError(f"writer for {display_uri(self.fs, self.path)} is already closed")
        self._finish_shard()
        self._closed = True
        return list(self.entries)

    def abort(self) -> None:
        """Stop writing and delete the shards written so far."""
        if self._open and self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001  (cleanup after a failure: deletion follows anyway)
                pass
            self.entries.append(ShardEntry(self.name_for(len(self.entries)), self._count, 0))
        self._file = self._counter = None
        self._open = False
        self._closed = True
        for entry in self.entries:
            path = join_path(self.path, entry.name)
            if self.fs.exists(path):
                self.fs.rm(path)


class PoolWriter:
    """Write samples into rotating shards under ``uri``; :meth:`close` writes the index.

    Use as a context manager: on an exception the shards written so far are deleted, so
    a failed build leaves no index-less pool behind for a later listing to pick up.

    Args:
        uri: Output pool prefix (any fsspec URI). Must not hold a pool already.
        shard_samples: Maximum samples per shard.
        shard_bytes: Target maximum shard size; exceeded only by a single oversized sample.
        storage_options: fsspec options for ``uri``.
        classes: Class names recorded in the index (``cls`` indexes this list).
        source: Provenance recorded in the index.

    Raises:
        ValueError: If a shard limit is not positive.
        PoolExistsError: If ``uri`` already holds an index or ``.tar`` shards.
    """

    def __init__(
        self,
        uri: str,
        *,
        shard_samples: int = DEFAULT_SHARD_SAMPLES,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        storage_options: Mapping[str, Any] | None = None,
        classes: list[str] | tuple[str, ...] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        if shard_samples <= 0 or shard_bytes <= 0:
            raise ValueError(f"shard_samples and shard_bytes must be positive, got {shard_samples}, {shard_bytes}")
        self.uri = uri
        self.fs, self.path = filesystem_for(uri, storage_options)
        self._refuse_existing()
        self.classes = tuple(classes) if classes is not None else None
        self.source = dict(source or {})
        self._series = ShardSeriesWriter(
            self.fs, self.path, shard_name, shard_samples=shard_samples, shard_bytes=shard_bytes
        )
        self._closed = False

    def _refuse_existing(self) -> None:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        taken = [n for n in names if n in (INDEX_NAME, BUILD_DIR) or n.endswith(".tar")]
        if taken:
            raise PoolExistsError(
                f"{self.uri} already holds a pool ({', '.join(sorted(taken)[:3])}, ...); "
                "write to a new prefix or delete the old pool first"
            )

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return self._series.num_samples

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        """Append one sample (see :meth:`ShardSeriesWriter.write`).

        Raises:
            ValueError: On an invalid key, no files, or non-bytes payloads.
            DuplicateKeyError: If ``key`` was already written to this pool.
        """
        if self._closed:
            raise PoolError(f"writer for {self.uri} is closed")
        self._series.write(key, files)

    def close(self) -> PoolIndex:
        """Finish the last shard and write ``index.json`` (atomically, after every shard).

        Returns:
            The index written.

        Raises:
            EmptyPoolError: If no sample was written (no index is written then).
        """
        if self._closed:
            raise PoolError(f"writer for {self.uri} is already closed")
        self._closed = True
        entries = self._series.finish()
        if not entries:
            raise EmptyPoolError(f"no samples were written to {self.uri}; the pool would be empty")
        index = PoolIndex(
            shards=tuple(entries),
            classes=self.classes,
            labeled=self._series.labeled,
            image_encoding=image_encoding_of(self._series.image_exts),
            source=self.source,
        )
        write_bytes_atomic(self.fs, join_path(self.path, INDEX_NAME), index.to_json().encode())
        return index

    def abort(self) -> None:
        """Stop writing and delete the shards written so far; no index is written."""
        self._closed = True
        self._series.abort()

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._closed:
            self.abort()
        elif not self._closed:
            self.close()


def image_encoding_of(exts: set[str] | frozenset[str] | tuple[str, ...]) -> str | None:
    """The index's ``image_encoding`` for a set of image extensions: the one, ``mixed``, or ``None``."""
    ordered = sorted(set(exts))
    return ordered[0] if len(ordered) == 1 else ("mixed" if ordered else None)
