"""Find a pool's shards: from its index, by listing the prefix, or from a brace pattern.

Pools written by this package carry ``index.json``; pools made by other tools
(webdataset's ``ShardWriter``, GNU tar) have none and are found by listing ``*.tar``
under the prefix, or by naming the shards with a brace pattern
(``s3://bucket/pool/pool-{000000..000099}.tar``) or a glob (``.../train-*.tar``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from braceexpand import braceexpand
from fsspec import AbstractFileSystem

from pipeline.pools.errors import EmptyPoolError, PoolNotFoundError, ShardReadError, UnfinishedPoolError
from pipeline.pools.format import BUILD_DIR, INDEX_NAME, PoolIndex
from pipeline.storage import (
    DEFAULT_ATTEMPTS,
    display_uri,
    filesystem_for,
    join_path,
    retry_call,
)

__all__ = ["ResolvedPool", "ShardRef", "read_index", "resolve_pool"]

Resolution = Literal["index", "listing", "pattern", "glob", "file"]
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class ShardRef:
    """One shard of a resolved pool.

    Attributes:
        uri: The shard's URI as a user would type it (plain path when local).
        path: The fsspec path (protocol stripped), for the pool's filesystem.
        samples: Sample count from the index, ``None`` when the pool has no index.
        bytes: Size from the index, or from listing when the pool has no index.
    """

    uri: str
    path: str
    samples: int | None
    bytes: int | None


@dataclass(frozen=True)
class ResolvedPool:
    """Where a pool's shards are and what its index says.

    Attributes:
        uri: The URI the pool was resolved from.
        fs: The fsspec filesystem holding the shards.
        shards: Shards in read order (index order, else sorted by name).
        index: The parsed index, ``None`` for pools made by other tools.
        how: How the shards were found.
    """

    uri: str
    fs: AbstractFileSystem
    shards: tuple[ShardRef, ...]
    index: PoolIndex | None
    how: Resolution

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class list from the index, ``None`` when unknown."""
        return self.index.classes if self.index is not None else None

    @property
    def num_samples(self) -> int | None:
        """Samples in the pool when the index says, else ``None``."""
        return self.index.num_samples if self.index is not None else None


def read_index(fs: AbstractFileSystem, index_path: str, attempts: int = DEFAULT_ATTEMPTS) -> PoolIndex:
    """Read and parse ``index.json``.

    Args:
        fs: Filesystem holding it.
        index_path: Stripped path of the index file.
        attempts: Tries for the read.

    Returns:
        The parsed index.

    Raises:
        PoolError: If it is malformed; ShardReadError if unreadable after retries.
    """
    uri = display_uri(fs, index_path)
    text = retry_call(lambda: fs.cat_file(index_path), what=uri, attempts=attempts, error=ShardReadError)
    return PoolIndex.from_json(text, where=uri)


def resolve_pool(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
) -> ResolvedPool:
    """Find the shards of the pool at ``uri``.

    ``uri`` may be a pool prefix (its ``index.json`` is used when present, else ``*.tar``
    directly under it, sorted), an ``index.json`` URI, a single ``.tar``, a brace pattern
    (``pool-{000000..000009}.tar``) or a glob (``pool-*.tar``).

    Args:
        uri: Pool location on any fsspec storage.
        storage_options: fsspec options (S3 endpoint, credentials, ...).
        attempts: Tries for each storage call.

    Returns:
        The resolved pool.

    Raises:
        PoolNotFoundError: If the prefix, the index or a named shard does not exist.
        EmptyPoolError: If the location holds no shards or the index lists no samples.
    """
    fs, path = filesystem_for(uri, storage_options)
    # Listings are cached per filesystem instance; a pool written by another process
    # (or another fsspec instance) since the last listing must be visible.
    fs.invalidate_cache()

    def exists(p: str) -> bool:
        return retry_call(lambda: fs.exists(p), what=display_uri(fs, p), attempts=attempts, error=ShardReadError)

    if path.endswith(".json"):
        if not exists(path):
            raise PoolNotFoundError(f"no pool index at {uri}: the file does not exist")
        return _from_index(uri, fs, path, attempts)
    if "{" in path:
        return _from_names(uri, fs, list(braceexpand(path)), "pattern", exists)
    if any(ch in path for ch in _GLOB_CHARS):
        matches = sorted(p for p in fs.glob(path) if p.endswith(".tar"))
        if not matches:
            raise EmptyPoolError(f"no .tar shards match {uri}")
        return _from_names(uri, fs, matches, "glob", exists)
    if path.endswith(".tar"):
        return _from_names(uri, fs, [path], "file", exists)

    index_path = join_path(path, INDEX_NAME)
    if exists(index_path):
        return _from_index(uri, fs, index_path, attempts)
    if exists(join_path(path, f"{BUILD_DIR}/plan.json")):
        raise UnfinishedPoolError(
            f"{uri} is an unfinished pool build (shards but no {INDEX_NAME} yet): run the same "
            "`lplgrad pool build` command again to finish it, or delete the prefix"
        )
    if not exists(path):
        raise PoolNotFoundError(
            f"no pool at {uri}: the prefix does not exist (check the URI, the bucket, and "
            "for S3-compatible stores the endpoint: AWS_ENDPOINT_URL_S3 or storage option endpoint_url)"
        )
    listing = retry_call(lambda: fs.ls(path, detail=True), what=uri, attempts=attempts, error=ShardReadError)
    tars = sorted(
        (entry for entry in listing if entry.get("type") == "file" and entry["name"].endswith(".tar")),
        key=lambda entry: entry["name"],
    )
    if not tars:
        raise EmptyPoolError(f"empty pool at {uri}: no {INDEX_NAME} and no .tar shards directly under the prefix")
    shards = tuple(ShardRef(display_uri(fs, e["name"]), e["name"], None, _size(e)) for e in tars)
    return ResolvedPool(uri=uri, fs=fs, shards=shards, index=None, how="listing")


def _size(entry: Mapping[str, Any]) -> int | None:
    size = entry.get("size")
    return int(size) if size is not None else None


def _from_index(uri: str, fs: AbstractFileSystem, index_path: str, attempts: int) -> ResolvedPool:
    index = read_index(fs, index_path, attempts)
    base = fs._parent(index_path)
    shards = tuple(
        ShardRef(display_uri(fs, join_path(base, s.name)), join_path(base, s.name), s.samples, s.bytes)
        for s in index.shards
    )
    if not shards or index.num_samples == 0:
        raise EmptyPoolError(f"empty pool at {uri}: its index lists no samples")
    return ResolvedPool(uri=uri, fs=fs, shards=shards, index=index, how="index")


def _from_names(
    uri: str, fs: AbstractFileSystem, paths: list[str], how: Resolution, exists: Callable[[str], bool]
) -> ResolvedPool:
    missing = [display_uri(fs, p) for p in paths if not exists(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise PoolNotFoundError(f"{uri} names {len(paths)} shard(s); {len(missing)} do not exist: {shown}")
    shards = tuple(ShardRef(display_uri(fs, p), p, None, None) for p in paths)
    return ResolvedPool(uri=uri, fs=fs, shards=shards, index=None, how=how)
