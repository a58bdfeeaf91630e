"""Read shards sample by sample, and check a pool before a job streams it.

The tar is walked with Python's ``tarfile`` in random-access mode, which on its own
accepts a truncated archive that happens to end on a header boundary; so this module
also insists on the end-of-archive marker, and on the WebDataset rule that a sample's
files are adjacent. Payload bytes are returned as bytes: nothing here decodes them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fsspec import AbstractFileSystem

from pipeline.pools.errors import (
    DuplicateKeyError,
    EmptyPoolError,
    ShardFormatError,
    ShardReadError,
)
from pipeline.pools.format import split_member_name
from pipeline.pools.listing import ResolvedPool, ShardRef
from pipeline.storage import (
    DEFAULT_ATTEMPTS,
    RetryingReader,
    StorageReadError,
    display_uri,
    open_for_read,
    retry_call,
)

__all__ = [
    "CheckMode",
    "PoolCheck",
    "RawSample",
    "check_pool",
    "iter_pool_samples",
    "iter_shard_samples",
]

CheckMode = Literal["auto", "fast", "full", "none"]
_BLOCK = 512
_ADJACENCY_FIX = (
    "the files of one sample must be consecutive in the tar; re-create it with sorted "
    "member names, e.g. `tar --sort=name -cf shard.tar ...`"
)


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: its key, its shard and its files' raw bytes.

    Attributes:
        key: The sample's ``__key__``.
        shard: URI of the shard holding it.
        files: Extension -> payload (empty payloads when read without data).
    """

    key: str
    shard: str
    files: dict[str, bytes]


def iter_shard_samples(
    fs: AbstractFileSystem, path: str, *, read_data: bool = True, attempts: int = DEFAULT_ATTEMPTS
) -> Iterator[RawSample]:
    """Yield the samples of one shard in tar order.

    Args:
        fs: Filesystem holding the shard.
        path: Stripped path of the shard.
        read_data: ``False`` skips payloads (seeks over them): a cheap header walk.
        attempts: Tries per storage operation.

    Yields:
        One :class:`RawSample` per key; members without an extension and non-files
        (directories, links) are not samples and are skipped, as WebDataset does.

    Raises:
        ShardFormatError: Not a tar, truncated, a sample's files not adjacent, or a file
            repeated within a sample.
        ShardReadError: Unreadable after retries. FileNotFoundError: The shard is missing.
    """
    uri = display_uri(fs, path)
    with open_for_read(fs, path, attempts, error=ShardReadError) as raw:
        try:
            yield from _walk(raw, uri, read_data)
        except tarfile.ReadError as err:
            reason = (
                "truncated tar (data ends inside a member)"
                if "unexpected end" in str(err)
                else (f"not a readable tar ({err})")
            )
            raise ShardFormatError(uri, reason) from None


def _walk(raw: RetryingReader, uri: str, read_data: bool) -> Iterator[RawSample]:
    tar = tarfile.open(fileobj=raw, mode="r:")  # type: ignore[call-overload]  (any binary file works)
    seen: set[str] = set()
    key: str | None = None
    files: dict[str, bytes] = {}
    for member in tar:
        if not member.isreg():
            continue
        parts = split_member_name(member.name)
        if parts is None:
            continue
        member_key, ext = parts
        if member_key != key:
            if key is not None:
                yield RawSample(key, uri, files)
                seen.add(key)
            if member_key in seen:
                raise ShardFormatError(
                    uri,
                    f"files of sample {member_key!r} are not adjacent ({member.name!r} "
                    f"follows other samples); {_ADJACENCY_FIX}",
                )
            key, files = member_key, {}
        if ext in files:
            raise ShardFormatError(uri, f"sample {member_key!r} has two {ext!r} files")
        if read_data:
            handle = tar.extractfile(member)
            assert handle is not None  # regular file
            files[ext] = handle.read()
        else:
            files[ext] = b""
    if key is not None:
        yield RawSample(key, uri, files)
    _check_end_marker(raw, tar.offset, uri)


def _check_end_marker(raw: RetryingReader, offset: int, uri: str) -> None:
    # tarfile stops quietly at EOF or at a bad header; a complete archive ends in zero blocks.
    raw.seek(offset)
    block = raw.read(_BLOCK)
    if len(block) < _BLOCK:
        raise ShardFormatError(
            uri, f"truncated tar: no end-of-archive marker (file ends at byte {offset + len(block)})"
        )
    if block != bytes(_BLOCK):
        raise ShardFormatError(uri, f"corrupt tar: unreadable header at byte {offset}")


@dataclass(frozen=True)
class PoolCheck:
    """What :func:`check_pool` found.

    Attributes:
        pool: The resolved pool.
        good: Shards that passed, in read order.
        problems: ``(shard URI, reason)`` for every shard that did not.
        num_samples: Samples in the good shards, when known (index or full scan).
        mode: The check that ran (``"fast"``, ``"full"`` or ``"none"``).
    """

    pool: ResolvedPool
    good: tuple[ShardRef, ...]
    problems: tuple[tuple[str, str], ...]
    num_samples: int | None
    mode: str


def check_pool(pool: ResolvedPool, *, mode: CheckMode = "auto", attempts: int = DEFAULT_ATTEMPTS) -> PoolCheck:
    """Check a pool's shards before streaming it, collecting per-shard problems.

    - ``fast``: each shard exists, its size matches the index (when there is one) and it
      ends in a tar end-of-archive marker: one metadata call and one 1 KiB ranged read per shard.
    - ``full``: walk every tar header (payloads skipped): catches truncation anywhere,
      files of a sample that are not adjacent, and duplicate keys across shards.
    - ``auto``: ``fast`` for pools with an index (the builder guarantees the rest),
      ``full`` for pools made by other tools.
    - ``none``: no storage calls.

    Args:
        pool: From :func:`~pipeline.pools.listing.resolve_pool`.
        mode: Which check.
        attempts: Tries per storage operation before a shard counts as unreadable.

    Returns:
        The shards that passed and the problems of those that did not.

    Raises:
        DuplicateKeyError: A key occurs in two places (``full``): the pool is invalid as a whole.
        EmptyPoolError: Every shard passed and together they hold no samples.
    """
    if mode == "auto":
        mode = "fast" if pool.index is not None else "full"
    if mode == "none":
        return PoolCheck(pool, pool.shards, (), pool.num_samples, "none")
    good: list[ShardRef] = []
    problems: list[tuple[str, str]] = []
    counts: list[int] = []
    first_seen: dict[str, int] = {}
    for i, shard in enumerate(pool.shards):
        try:
            if mode == "fast":
                _fast_check(pool.fs, shard, attempts)
                counts.append(shard.samples or 0)
            else:
                counts.append(_full_check(pool, i, first_seen, attempts))
        except (ShardFormatError, StorageReadError, FileNotFoundError, PermissionError) as err:
            problems.append((shard.uri, _reason(err)))
            continue
        good.append(shard)
    known = mode == "full" or pool.index is not None
    total = sum(counts) if known else None
    if not problems and total == 0:
        raise EmptyPoolError(f"empty pool at {pool.uri}: its {len(good)} shard(s) hold no samples")
    return PoolCheck(pool, tuple(good), tuple(problems), total, mode)


def _reason(err: BaseException) -> str:
    if isinstance(err, ShardFormatError):
        return err.reason
    if isinstance(err, StorageReadError):
        return "; ".join(reason for _, reason in err.problems)
    if isinstance(err, FileNotFoundError):
        return "shard does not exist"
    return f"{type(err).__name__}: {err}"


def _fast_check(fs: AbstractFileSystem, shard: ShardRef, attempts: int) -> None:
    size = int(retry_call(lambda: fs.info(shard.path), what=shard.uri, attempts=attempts, error=ShardReadError)["size"])
    if shard.bytes is not None and size != shard.bytes:
        raise ShardFormatError(shard.uri, f"size {size} bytes but the index says {shard.bytes}: truncated or rewritten")
    if size < 2 * _BLOCK or size % _BLOCK:
        raise ShardFormatError(shard.uri, f"truncated tar: {size} bytes is not a whole number of blocks")
    tail = retry_call(
        lambda: fs.cat_file(shard.path, start=size - 2 * _BLOCK, end=size),
        what=shard.uri,
        attempts=attempts,
        error=ShardReadError,
    )
    if tail != bytes(2 * _BLOCK):
        raise ShardFormatError(shard.uri, "truncated tar: no end-of-archive marker")


def _full_check(pool: ResolvedPool, i: int, first_seen: dict[str, int], attempts: int) -> int:
    shard = pool.shards[i]
    keys = [s.key for s in iter_shard_samples(pool.fs, shard.path, read_data=False, attempts=attempts)]
    if shard.samples is not None and len(keys) != shard.samples:
        raise ShardFormatError(shard.uri, f"{len(keys)} samples but the index says {shard.samples}")
    for key in keys:
        j = first_seen.setdefault(key, i)
        if j != i:
            raise DuplicateKeyError(key, pool.shards[j].uri, shard.uri)
    return len(keys)


def iter_pool_samples(pool: ResolvedPool, *, attempts: int = DEFAULT_ATTEMPTS) -> Iterator[RawSample]:
    """Yield every sample of the pool with its bytes, shard by shard, strictly.

    For single-process tools (labeling, copying); Ray jobs stream with Ray Data instead.

    Args:
        pool: The resolved pool.
        attempts: Tries per storage operation.

    Yields:
        Samples in pool order.

    Raises:
        DuplicateKeyError: A key seen in an earlier shard (both shard URIs named).
        ShardFormatError, ShardReadError, FileNotFoundError: A shard is bad; no shard is skipped.
    """
    first_seen: dict[str, str] = {}
    for shard in pool.shards:
        for sample in iter_shard_samples(pool.fs, shard.path, attempts=attempts):
            first = first_seen.setdefault(sample.key, shard.uri)
            if first != shard.uri:
                raise DuplicateKeyError(sample.key, first, shard.uri)
            yield sample
