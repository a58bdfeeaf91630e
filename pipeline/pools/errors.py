"""Errors raised by pool building, listing, scanning and labeling.

Every error names the pool location it is about (a URI, a shard, a key) and, where there is
one, the fix. All derive from :class:`PoolError` so entrypoints can catch one type and print
a clean message; each also derives from the builtin it specialises (``FileNotFoundError``,
``ValueError``, ``OSError``) so generic handlers keep working.
"""

from __future__ import annotations

from pipeline.storage import StorageReadError

__all__ = [
    "DuplicateKeyError",
    "EmptyPoolError",
    "LabelError",
    "PoolError",
    "PoolExistsError",
    "PoolNotFoundError",
    "ShardFormatError",
    "ShardReadError",
    "UnfinishedPoolError",
]


class PoolError(Exception):
    """Base class of every pool error."""


class PoolNotFoundError(PoolError, FileNotFoundError):
    """Nothing exists at the pool URI (wrong prefix, bucket or endpoint)."""


class EmptyPoolError(PoolError, ValueError):
    """The pool URI exists but holds no shards, or its shards hold no samples."""


class PoolExistsError(PoolError, FileExistsError):
    """A build or label command would write over an existing pool."""


class UnfinishedPoolError(PoolError):
    """The prefix holds a pool build that has not finished (shards, but no index yet)."""


class DuplicateKeyError(PoolError, ValueError):
    """A ``__key__`` occurs twice in one pool.

    Attributes:
        key: The repeated key.
        first: Where it was seen first (shard URI).
        second: Where it was seen again (shard URI).
    """

    def __init__(self, key: str, first: str, second: str) -> None:
        self.key = key
        self.first = first
        self.second = second
        where = f"in {first} and again in {second}" if first != second else f"twice in {first}"
        super().__init__(
            f"duplicate sample key {key!r}: {where}; keys must be unique in a pool "
            "(rename one sample or drop one shard)"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Rebuild from the fields: errors raised in Ray tasks are pickled to reach the driver.
        return (type(self), (self.key, self.first, self.second))


class ShardFormatError(PoolError, ValueError):
    """A shard is not a well-formed WebDataset tar (truncated, not a tar, split samples).

    Attributes:
        shard: The shard URI.
        reason: What is wrong with it.
    """

    def __init__(self, shard: str, reason: str) -> None:
        self.shard = shard
        self.reason = reason
        super().__init__(f"shard {shard}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.shard, self.reason))


class ShardReadError(PoolError, StorageReadError):
    """One or more shards could not be read, after retries.

    Attributes:
        problems: ``(shard URI, reason)`` for every shard that failed.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {shard}: {reason}" for shard, reason in self.problems)
        # Not StorageReadError.__init__: the message names shards, and OSError's own __init__ is kept.
        OSError.__init__(self, f"{len(self.problems)} shard(s) could not be read:\n{lines}")


class LabelError(PoolError, ValueError):
    """A labels table does not fit the pool (unknown keys, labels outside the class list)."""
