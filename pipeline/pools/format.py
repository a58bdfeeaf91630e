"""The pool format: WebDataset tar shards under one prefix, plus a JSON index written last.

A pool is a prefix (directory) holding ``pool-000000.tar``, ``pool-000001.tar``, ... Each
sample is a run of adjacent tar members sharing a ``__key__`` (the member name up to its
first ``.``):

- ``<key>.png`` | ``.jpg`` | ``.jpeg`` | ``.webp``: exactly one image, any size, RGB or grayscale;
- ``<key>.cls``: optional label, an ASCII integer indexing the pool's class list;
- ``<key>.json``: optional metadata, a JSON object.

The builder writes ``index.json`` next to the shards after the last shard is closed, so
a reader that finds the index finds complete shards. Its schema (version 1)::

    {
      "format": "lplgrad-pool", "version": 1,
      "created": "2026-01-01T00:00:00Z",         # UTC, ISO 8601
      "num_samples": 60000,
      "classes": ["0", "1", ...] | null,          # cls i means classes[i]
      "labeled": true,                            # every sample carries cls
      "image_encoding": "png" | "jpg" | "webp" | "mixed" | null,
      "source": {...},                            # provenance: how the pool was made
      "shards": [{"name": "pool-000000.tar", "samples": 10000, "bytes": 16312320}, ...]
    }

Shard ``name``s are relative to the index's directory, so a pool stays valid when its
prefix is copied or moved (between buckets, or from S3 to local disk).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.pools.errors import PoolError

__all__ = [
    "BUILD_DIR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "INDEX_NAME",
    "LABEL_EXTENSION",
    "META_EXTENSION",
    "PoolIndex",
    "ShardEntry",
    "brace_pattern",
    "partition_shard_name",
    "shard_name",
    "split_member_name",
    "utc_now",
    "validate_key",
]

FORMAT_NAME = "lplgrad-pool"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
# An unfinished build keeps its plan and one record per finished partition here; the folder is
# removed once index.json is written (docs/pools.md, "Resuming").
BUILD_DIR = "_build"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
META_EXTENSION = "json"

_SHARD_DIGITS = 6
# WebDataset splits a member name at the first "." of its basename, so keys carry none;
# no leading "_" because Ray Data's listing skips such names and webdataset reserves "__".
_KEY_RE = re.compile(r"^[^._/\s][^.\s]*$")
# Same rule as webdataset/Ray Data: key = path up to the first "." of the basename.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def shard_name(index: int) -> str:
    """Return the name of shard ``index``: ``pool-000000.tar`` for 0."""
    return f"pool-{index:0{_SHARD_DIGITS}d}.tar"


def partition_shard_name(partition: int, part: int) -> str:
    """Return the name of shard ``part`` of build partition ``partition``.

    A partition's first shard is ``shard_name(partition)``, so a build whose partitions each fit
    in one shard has the same names as the single-stream writer. A partition that overflows
    ``shard_bytes`` continues in ``pool-000003_0001.tar``, ...: ``_`` sorts after ``.``, so
    the names still sort in sample order.
    """
    base = shard_name(partition)
    return base if part == 0 else f"{base[: -len('.tar')]}_{part:04d}.tar"


def brace_pattern(num_shards: int) -> str:
    """Return the brace pattern naming shards ``0 .. num_shards-1``, e.g. ``pool-{000000..000009}.tar``."""
    last = max(num_shards - 1, 0)
    return f"pool-{{{0:0{_SHARD_DIGITS}d}..{last:0{_SHARD_DIGITS}d}}}.tar"


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with a ``Z`` suffix, to the second."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def validate_key(key: str) -> None:
    """Check that ``key`` can be a WebDataset sample key.

    Args:
        key: Candidate key.

    Raises:
        ValueError: If it is empty, contains ``.`` or whitespace, starts with ``_`` or ``/``,
            or has an empty or ``..`` path segment.
    """
    segments = key.split("/")
    if not _KEY_RE.match(key) or any(s in ("", "..") for s in segments):
        raise ValueError(
            f"invalid sample key {key!r}: keys are non-empty, without '.' or whitespace, "
            "and do not start with '_' or '/' (the tar member name is '<key>.<ext>')"
        )


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into ``(key, extension)`` the way WebDataset does.

    Args:
        name: Tar member name, e.g. ``"train/000017.png"``.

    Returns:
        ``("train/000017", "png")``, or ``None`` when the basename has no ``.``.
    """
    match = _MEMBER_RE.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class ShardEntry:
    """One shard in a pool index.

    Attributes:
        name: File name relative to the index's directory.
        samples: Number of samples in the shard.
        bytes: Size of the tar file in bytes (truncation shows up as a mismatch).
    """

    name: str
    samples: int
    bytes: int


@dataclass(frozen=True)
class PoolIndex:
    """The contents of ``index.json`` (see the module docstring for the JSON schema).

    Attributes:
        shards: Shards in read order.
        classes: Class names; ``cls`` values index this list. ``None`` when unknown.
        labeled: Whether every sample carries ``cls``.
        image_encoding: Encoding of the images, ``"mixed"`` or ``None`` when unknown.
        created: Creation time (UTC, ISO 8601).
        source: Provenance (source kind and its parameters), free-form JSON.
    """

    shards: tuple[ShardEntry, ...]
    classes: tuple[str, ...] | None = None
    labeled: bool = False
    image_encoding: str | None = None
    created: str = field(default_factory=utc_now)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        """Total shard bytes."""
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        """Serialise to the version-1 JSON schema (keys in a fixed order, indented)."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": self.created,
            "num_samples": self.num_samples,
            "classes": list(self.classes) if self.classes is not None else None,
            "labeled": self.labeled,
            "image_encoding": self.image_encoding,
            "source": self.source,
            "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in self.shards],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "index") -> PoolIndex:
        """Parse and validate an index document.

        Args:
            text: The JSON text.
            where: The index URI, for error messages.

        Returns:
            The parsed index.

        Raises:
            PoolError: If the JSON is invalid, of another format or version, or inconsistent.
        """
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PoolError(f"pool index {where} is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise PoolError(f'{where} is not a pool index (expected "format": "{FORMAT_NAME}")')
        if doc.get("version") != FORMAT_VERSION:
            raise PoolError(
                f"pool index {where} has version {doc.get('version')!r}; this code reads "
                f"version {FORMAT_VERSION} (upgrade lplgrad or rebuild the pool)"
            )
        try:
            shards = tuple(
                ShardEntry(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"])) for s in doc["shards"]
            )
            classes = doc.get("classes")
            index = cls(
                shards=shards,
                classes=tuple(str(c) for c in classes) if classes is not None else None,
                labeled=bool(doc.get("labeled", False)),
                image_encoding=doc.get("image_encoding"),
                created=str(doc.get("created", "")),
                source=dict(doc.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PoolError(f"pool index {where} is malformed: {type(err).__name__}: {err}") from None
        if "num_samples" in doc and doc["num_samples"] != index.num_samples:
            raise PoolError(
                f"pool index {where} says num_samples={doc['num_samples']} but its shards sum to {index.num_samples}"
            )
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise PoolError(f"pool index {where} lists a shard twice")
        return index
