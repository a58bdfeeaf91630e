"""Feature store: per-sample penultimate features of a pool under one frozen backbone, on any
fsspec storage, for proxy training and proxy queries (docs/proxy.md).

Layout under the store URI::

    store.json                          the committed index, written last
    generations/{id}/*.parquet          rows key, shard, generation, features, error

Every extraction writes a new generation with the shards it (re-)extracted; `store.json` then
names, per pool shard, its identity when extracted (`pipeline.manifest.incremental.shard_identity`) and
the generation holding its rows. A row is current when its generation is its shard's: rows of a
shard re-extracted later stay in the older generation's files but are never read. A failed
extraction leaves a generation that no index names, so readers never see it, and a later
commit deletes it. One store holds one backbone: a different backbone hash makes every shard
stale.

Commits are numbered. An extraction that started from version n claims version n+1 by creating
`commits/{n+1:08d}.json` (the whole index) exclusively, then rewrites `store.json`: the commit
primitive query runs and alignment rounds use too (`pipeline.claims.claim_then_publish`; `O_EXCL`
locally, `If-None-Match` on S3), and the index records which path the claim took (`claim`). Of two
extractions that started from the same version only one commits; the other deletes its own
generation and fails with a message to run it again. A reader rolls `store.json` forward through
any newer commit file, so a job killed between the claim and `store.json` loses nothing. Garbage
collection only deletes unnamed generations that started before the committing one, never a
generation a later extraction is still writing.

Features are `fixed_size_list<float32>[dim]`; error rows (a sample that did not decode, an
unreadable shard) have null features and say why in `error`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.claims import Claim, claim_then_publish, follow_claims
from pipeline.storage import display_uri, filesystem_for, write_bytes_atomic

__all__ = [
    "FEATURE_COLUMNS",
    "STORE_FILE",
    "Backbone",
    "ExtractionPlan",
    "FeatureStore",
    "FeatureStoreError",
    "StoreShard",
    "commit_store",
    "features_matrix",
    "features_table",
    "new_generation",
    "open_store",
    "plan_extraction",
]

STORE_FILE = "store.json"
FORMAT = "lplgrad-feature-store"
VERSION = 1
FEATURE_COLUMNS = ("key", "shard", "generation", "features", "error")


class FeatureStoreError(ValueError):
    """A feature store that is missing, unreadable, or does not fit what the caller needs."""


@dataclass(frozen=True)
class Backbone:
    """What made the features: a content hash (sha256 of the weights or checkpoint file), the
    URI it came from, the registry model and the feature width."""

    sha256: str
    source: str
    model: str
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "source": self.source, "model": self.model, "dim": self.dim}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Backbone:
        return cls(str(values["sha256"]), str(values["source"]), str(values["model"]), int(values["dim"]))


@dataclass(frozen=True)
class StoreShard:
    """One pool shard in the index: its identity when extracted and where its rows live."""

    uri: str
    identity: Mapping[str, Any] | None
    generation: str
    rows: int
    errors: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "identity": dict(self.identity) if self.identity is not None else None,
            "generation": self.generation,
            "rows": self.rows,
            "errors": self.errors,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StoreShard:
        return cls(
            values["uri"], values.get("identity"), values["generation"], int(values["rows"]), int(values["errors"])
        )


@dataclass(frozen=True)
class FeatureStore:
    """A committed store (from :func:`open_store`)."""

    uri: str
    pool_uri: str
    backbone: Backbone
    shards: tuple[StoreShard, ...]
    committed_at: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    sequence: int = 0  # the commit number (0: a store committed before commits were numbered)
    claim: str | None = None  # how its commit file was created: exclusive | check-then-put (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "pool": self.pool_uri,
            "backbone": self.backbone.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
            "committed_at": self.committed_at,
            "rows": self.num_rows,
            "errors": sum(s.errors for s in self.shards),
            "sequence": self.sequence,
            **({"claim": self.claim} if self.claim is not None else {}),
        }

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def current(self) -> dict[str, str]:
        """shard URI -> the generation holding its current rows."""
        return {s.uri: s.generation for s in self.shards}

    def files(self) -> list[str]:
        """Parquet files of the generations the index names (paths on the store's filesystem)."""
        fs, root = filesystem_for(self.uri, self.storage_options)
        files = []
        for generation in sorted(set(self.current.values())):
            directory = f"{root.rstrip('/')}/generations/{generation}"
            files += sorted(p for p in fs.find(directory) if p.endswith(".parquet"))
        return files

    def iter_tables(self, columns: Sequence[str] = FEATURE_COLUMNS) -> Iterator[pa.Table]:
        """Current rows, one parquet file at a time."""
        fs, _ = filesystem_for(self.uri, self.storage_options)
        wanted = list(dict.fromkeys([*columns, "shard", "generation"]))
        for path in self.files():
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=wanted)
            yield keep_current(table, self.current).select(list(columns))

    def find(self, keys: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """({key: [dim] features} for keys with features, {key: error} for keys with an error row)."""
        wanted = pa.array(sorted(set(keys)), pa.string())
        found: dict[str, np.ndarray] = {}
        failed: dict[str, str] = {}
        for table in self.iter_tables(("key", "features", "error")):
            hit = table.filter(pa.compute.is_in(table.column("key"), wanted))
            for key, error, row in zip(
                hit.column("key").to_pylist(), hit.column("error").to_pylist(), features_matrix(hit)
            ):
                if error is None:
                    found[key] = row
                else:
                    failed[key] = error
        return found, failed

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        """Features of `keys`, in their order: [len(keys), dim] float32.

        Raises:
            FeatureStoreError: a key has no row, or only an error row.
        """
        keys = list(keys)
        found, failed = self.find(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            reasons = "; ".join(f"{k}: {failed.get(k, 'not in the store')}" for k in missing[:5])
            raise FeatureStoreError(
                f"{len(missing)} of {len(keys)} keys have no features in {self.uri} ({reasons}); "
                "extract the pool they come from with the same backbone (lplgrad features)"
            )
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.backbone.dim), np.float32)


def features_matrix(table: pa.Table) -> np.ndarray:
    """The `features` column as [N, dim] float32; rows with null features (error rows) are zeros."""
    column = table.column("features").combine_chunks()
    dim = column.type.list_size
    # flatten() skips null lists, so fill them first to keep one row per entry.
    if column.null_count:
        column = pa.compute.fill_null(column, pa.scalar([0.0] * dim, column.type))
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def keep_current(table: pa.Table, current: Mapping[str, str]) -> pa.Table:
    """Rows whose generation is their shard's current one (older rows of re-extracted shards go)."""
    shards, generations = table.column("shard").to_pylist(), table.column("generation").to_pylist()
    keep = [current.get(s) == g for s, g in zip(shards, generations)]
    return table if all(keep) else table.filter(pa.array(keep, pa.bool_()))


def features_table(
    keys: Sequence[str | None],
    shards: Sequence[str],
    generation: str,
    features: np.ndarray,
    errors: Sequence[str | None],
) -> pa.Table:
    """Build rows in the store's schema. `features` is [N, dim]; rows with an error get null features."""
    n, dim = features.shape
    values = pa.array(np.ascontiguousarray(features, np.float32).reshape(-1), pa.float32())
    valid = pa.array([e is None for e in errors], pa.bool_())
    column = (
        pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.compute.invert(valid))
        if n
        else pa.array([], pa.list_(pa.float32(), dim))
    )
    return pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "shard": pa.array(list(shards), pa.string()),
            "generation": pa.array([generation] * n, pa.string()),
            "features": column,
            "error": pa.array(list(errors), pa.string()),
        }
    )


@dataclass(frozen=True)
class ExtractionPlan:
    """Which pool shards keep their rows and which are extracted now, and why."""

    reuse: dict[str, StoreShard]
    extract: list[str]
    reason: str


def plan_extraction(
    previous: FeatureStore | None,
    backbone: Backbone,
    pool_uri: str,
    shards: Mapping[str, Mapping[str, Any] | None],
    incremental: bool = True,
) -> ExtractionPlan:
    """Reuse a shard's rows when the store has them from this backbone and the shard's identity
    is unchanged and known; extract every other shard.

    Args:
        previous: the committed store at the output URI, or None.
        backbone: the backbone of this extraction.
        pool_uri: the pool being extracted.
        shards: shard URI -> identity now (None: the storage says nothing usable).
        incremental: False extracts every shard.
    """
    every = list(shards)
    if not incremental:
        return ExtractionPlan({}, every, "incremental=false: every shard is extracted")
    if previous is None:
        return ExtractionPlan({}, every, "no committed store: every shard is extracted")
    if previous.backbone.sha256 != backbone.sha256:
        return ExtractionPlan(
            {},
            every,
            f"backbone changed ({previous.backbone.sha256[:12]} -> {backbone.sha256[:12]}): every shard is extracted",
        )
    if previous.pool_uri != pool_uri:
        return ExtractionPlan(
            {}, every, f"the store was made from {previous.pool_uri}, not {pool_uri}: every shard is extracted"
        )
    known = {s.uri: s for s in previous.shards}
    reuse = {
        uri: known[uri]
        for uri, identity in shards.items()
        if uri in known and identity is not None and known[uri].identity == dict(identity)
    }
    extract = [uri for uri in every if uri not in reuse]
    return ExtractionPlan(reuse, extract, f"reusing {len(reuse)} unchanged shards, extracting {len(extract)}")


def new_generation() -> str:
    """A sortable, unique generation id."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def generation_uri(store_uri: str, generation: str) -> str:
    return f"{store_uri.rstrip('/')}/generations/{generation}"


def count_generation(
    store_uri: str, generation: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, tuple[int, int]]:
    """shard URI -> (rows, error rows) written to one generation (read from its files)."""
    fs, root = filesystem_for(store_uri, storage_options)
    directory = f"{root.rstrip('/')}/generations/{generation}"
    counts: dict[str, list[int]] = {}
    if not fs.exists(directory):
        return {}
    for path in sorted(p for p in fs.find(directory) if p.endswith(".parquet")):
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["shard", "error"])
        for shard, error in zip(table.column("shard").to_pylist(), table.column("error").to_pylist()):
            entry = counts.setdefault(shard, [0, 0])
            entry[0] += 1
            entry[1] += error is not None
    return {shard: (rows, errors) for shard, (rows, errors) in counts.items()}


def commit_store(
    uri: str,
    pool_uri: str,
    backbone: Backbone,
    shards: Sequence[StoreShard],
    storage_options: Mapping[str, Any] | None = None,
    *,
    based_on: int | None = None,
    generation: str | None = None,
) -> FeatureStore:
    """Claim the next commit number, write `store.json`, then delete generations no longer named.

    Args:
        uri: The store.
        pool_uri, backbone, shards: The index to commit.
        storage_options: fsspec options.
        based_on: The ``sequence`` of the store the extraction started from (0: none); ``None``
            reads the store's current one (no protection against a concurrent extraction).
        generation: The generation this extraction wrote; deleted if the commit is lost, and the
            bound of garbage collection (only generations started before it are deleted).

    Raises:
        FeatureStoreError: If another extraction committed since ``based_on``.
    """
    fs, root = filesystem_for(uri, storage_options)
    fs.makedirs(root, exist_ok=True)  # a no-op on object stores; a store with no rows yet has no directory
    if based_on is None:
        current = open_store(uri, storage_options, missing_ok=True)
        based_on = current.sequence if current is not None else 0
    store = FeatureStore(
        uri,
        pool_uri,
        backbone,
        tuple(shards),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dict(storage_options or {}),
        based_on + 1,
    )

    def index(kind: str) -> bytes:
        return json.dumps(replace(store, claim=kind).to_dict(), indent=1, sort_keys=True).encode()

    def publish(claim: Claim) -> None:
        write_bytes_atomic(fs, f"{root.rstrip('/')}/{STORE_FILE}", index(claim.kind))
        _collect_garbage(fs, root, set(store.current.values()), before=generation)

    try:
        claim = claim_then_publish(fs, _commit_path(root, store.sequence), index, publish)
    except FileExistsError:
        if generation is not None:
            directory = f"{root.rstrip('/')}/generations/{generation}"
            if fs.exists(directory):
                fs.rm(directory, recursive=True)
        raise FeatureStoreError(
            f"another `lplgrad features` committed version {store.sequence} of {uri} while this one ran; nothing of "
            "this run was committed (run it again: shards the other one extracted are reused)"
        ) from None
    return replace(store, claim=claim.kind)


def _commit_path(root: str, sequence: int) -> str:
    return f"{root.rstrip('/')}/commits/{sequence:08d}.json"


def _next_commit(root: str) -> Callable[[bytes | None], str]:
    def path(index: bytes | None) -> str:
        return _commit_path(root, (int(json.loads(index).get("sequence", 0)) if index is not None else 0) + 1)

    return path


def _collect_garbage(fs: AbstractFileSystem, root: str, live: set[str], before: str | None = None) -> None:
    # Generation ids start with their UTC start time (new_generation): one that started after this
    # extraction may belong to a job still writing, and is left alone.
    directory = f"{root.rstrip('/')}/generations"
    if not fs.exists(directory):
        return
    for path in fs.ls(directory, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in live or (before is not None and name.split("-", 1)[0] >= before.split("-", 1)[0]):
            continue
        fs.rm(path, recursive=True)


def open_store(
    uri: str, storage_options: Mapping[str, Any] | None = None, missing_ok: bool = False
) -> FeatureStore | None:
    """Read a committed store.

    Raises:
        FeatureStoreError: no store.json (unless `missing_ok`), or not a store of this format.
    """
    fs, root = filesystem_for(uri, storage_options)
    fs.invalidate_cache()  # another process may have committed since this one last listed
    path = f"{root.rstrip('/')}/{STORE_FILE}"
    try:
        # Commits claimed after store.json was last rewritten (a job killed between the two) count.
        index, _ = follow_claims(fs, fs.cat_file(path) if fs.exists(path) else None, _next_commit(root))
        values: dict[str, Any] | None = json.loads(index) if index is not None else None
        if values is None:
            if missing_ok:
                return None
            raise FeatureStoreError(
                f"{uri} is not a feature store: it has no {STORE_FILE} (extract one with `lplgrad features`)"
            )
        if values.get("format") != FORMAT:
            raise FeatureStoreError(f"{display_uri(fs, path)} is not an lplgrad feature store index")
        if values.get("version") != VERSION:
            raise FeatureStoreError(
                f"{display_uri(fs, path)} has store version {values.get('version')}; this code reads {VERSION}"
            )
        return FeatureStore(
            uri,
            values["pool"],
            Backbone.from_dict(values["backbone"]),
            tuple(StoreShard.from_dict(s) for s in values["shards"]),
            values["committed_at"],
            dict(storage_options or {}),
            int(values.get("sequence", 0)),
            values.get("claim"),
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise FeatureStoreError(f"cannot read {display_uri(fs, path)}: {error}") from error
