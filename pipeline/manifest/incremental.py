"""Incremental query runs: copy an unchanged shard's score rows from the previous run.

A shard's rows in ``scores/`` depend only on the shard's bytes, the checkpoint's weights, the
gradient-norm reduction (``norm``) and the scoring code. When all of these are unchanged since the
newest earlier committed run under the same output root, that run's rows for the shard are copied
into the new run instead of being recomputed; new or changed shards are scored, removed shards
drop out. Everything downstream of the rows (acquisition values, exclusions, top-k, summary) is
recomputed every night, so strategy, k, seed and stochastic mode may change between nights.

Shard identity (:func:`shard_identity`) is the size plus, in this order of preference, the
``ETag`` (S3 and compatible stores; GCS's ``etag``), which changes with the content and survives
nothing but an identical upload, or else the modification time (``mtime`` on local and network
disks, ``LastModified`` on object stores without an ETag, fsspec's ``created`` as a last
resort). A shard rewritten with the same size by a tool that also restores its mtime (``cp -p``,
``rsync -a`` of changed bytes) would look unchanged on a disk; object stores have no such hole.
A storage reporting none of these gives no identity, and such shards are always scored.

Copies, not references: reused rows are written into the new run's own ``scores/``, so every
committed run is self-contained (old runs can be deleted) and a chain of nights that each
reuse from the night before never reads further back than one run.

Keys an exclusion skipped have no row to copy. Each run records them in ``excluded.parquet``;
a reused shard's keys that the previous run excluded and this run does not are scored again
(only those keys are decoded), and the ones excluded both times count as excluded again.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from fsspec import AbstractFileSystem

from pipeline.manifest._inputs import QueryInputs
from pipeline.manifest._record import Manifest
from pipeline.manifest.commit import software_versions
from pipeline.manifest.read import iter_scores, load_errors, load_excluded, read_manifest
from pipeline.storage import DEFAULT_ATTEMPTS, display_uri, retry_call

__all__ = [
    "SCORE_PARAMS",
    "ReusePlan",
    "iter_reused_rows",
    "plan_reuse",
    "shard_identities",
    "shard_identity",
    "shard_records",
]

# strategy_params that change the stored score columns; the others (seed, stochastic mode, beta)
# only change acquisition values, which are recomputed from the columns every run. `gradnorm`:
# whether the backward pass ran (a margin run leaves `score` empty, an lplgrad run cannot reuse it).
SCORE_PARAMS = ("norm", "gradnorm")
# Packages whose version can change the stored scores.
_SCORING_PACKAGES = ("lplgrad", "torch")


def shard_identity(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """Size plus ETag, else size plus modification time, from an fsspec ``info``/``ls`` entry.

    Args:
        info: What ``fs.info(path)`` or ``fs.ls(parent, detail=True)`` says about a shard.

    Returns:
        ``{"size": int, "etag": str}`` (quotes stripped) or ``{"size": int, "mtime": float}``
        (seconds since the epoch), ``None`` when the size or both version fields are missing.
    """
    size = info.get("size")
    if size is None:
        return None
    for name in ("ETag", "etag"):
        if info.get(name):
            return {"size": int(size), "etag": str(info[name]).strip('"')}
    for name in ("mtime", "LastModified", "created"):
        stamp = info.get(name)
        if stamp is not None:
            return {"size": int(size), "mtime": _epoch_seconds(stamp)}
    return None


def _epoch_seconds(stamp: Any) -> float | str:
    if isinstance(stamp, _dt.datetime):
        return stamp.timestamp()
    if isinstance(stamp, (int, float)):
        return float(stamp)
    return str(stamp)  # a format we do not parse: still compares equal only to itself


def shard_identities(
    fs: AbstractFileSystem, paths: Sequence[str], attempts: int = DEFAULT_ATTEMPTS
) -> dict[str, dict[str, Any] | None]:
    """:func:`shard_identity` of every shard, from one listing per directory.

    A HEAD request per shard would be thousands of round trips on a large S3 pool; a listing
    returns sizes, ETags and modification times in pages of 1000. ``fs.info`` is asked only for
    shards the listing does not show.

    Args:
        fs: The pool's filesystem.
        paths: Shard paths (protocol stripped), as in ``ShardRef.path``.
        attempts: Tries per storage call.

    Returns:
        Path -> identity (``None`` when the storage reports none).
    """
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        by_parent[fs._parent(path)].append(path)
    found: dict[str, dict[str, Any] | None] = {}
    for parent, members in by_parent.items():
        listing = retry_call(
            functools.partial(fs.ls, parent, detail=True), what=display_uri(fs, parent), attempts=attempts
        )
        entries = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in listing}
        for path in members:
            entry = entries.get(path.rsplit("/", 1)[-1])
            if entry is None:
                entry = retry_call(functools.partial(fs.info, path), what=display_uri(fs, path), attempts=attempts)
            found[path] = shard_identity(entry)
    return found


@dataclass(frozen=True)
class ReusePlan:
    """What an incremental run takes from the previous run.

    Attributes:
        source: URI of the run whose rows are copied; ``None`` when nothing is reused.
        source_id: Its run id.
        reused: Shard URI -> keys of that shard which the source excluded and this run does not:
            they have no row to copy and are scored in this run (usually none).
        still_excluded: ``(key, shard)`` of reused shards' keys excluded by the source and by this
            run: no row to copy, counted as excluded.
        reason: One line for the log: what is reused, or why nothing is.
    """

    source: str | None = None
    source_id: str | None = None
    reused: Mapping[str, frozenset[str]] = field(default_factory=dict)
    still_excluded: tuple[tuple[str, str], ...] = ()
    reason: str = "nothing reused"

    def to_score(self, shards: Sequence[str]) -> list[str]:
        """The shards the scoring pipeline must read: not reused, or reused with keys to score."""
        return [uri for uri in shards if uri not in self.reused or self.reused[uri]]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``reuse`` object."""
        return {"source": self.source, "reason": self.reason}


def plan_reuse(
    source: str | None,
    inputs: QueryInputs,
    excluded: Collection[str],
    storage_options: Mapping[str, Any] | None = None,
) -> ReusePlan:
    """Decide which shards of ``inputs`` can take their rows from the committed run ``source``.

    Args:
        source: The previous committed run (``pipeline.manifest.previous_run``), or ``None``.
        inputs: This run's inputs; shards need an ``identity`` to be reused.
        excluded: Keys this run excludes.
        storage_options: fsspec options.

    Returns:
        The plan. Nothing is reused when this run or the source scores a random subset, the
        checkpoint hash, a :data:`SCORE_PARAMS` entry or a scoring package version differs, or
        the source predates incremental runs. A shard is reused when its URI and identity are
        the source's and the source had no whole-shard error for it.
    """
    if inputs.subset_size is not None:
        return ReusePlan(reason="this run scores a random subset: incremental reuse needs the whole pool")
    if source is None:
        return ReusePlan(reason="no earlier committed run under the output root: every shard is scored")
    previous = read_manifest(source, storage_options)
    why_not = _incompatible(previous, inputs)
    before = load_excluded(source, storage_options) if why_not is None else None
    if before is None:
        why_not = why_not or "it has no excluded.parquet (committed before incremental runs)"
        return ReusePlan(reason=f"nothing reused from {previous.run_id}: {why_not}")
    known = {s["uri"]: s.get("identity") for s in previous.inputs["pool"]["shards"]}
    errors = load_errors(source, storage_options)
    broken = {s for k, s in zip(errors.column("key").to_pylist(), errors.column("shard").to_pylist()) if k is None}
    unchanged = {
        s.uri
        for s in inputs.shards
        if s.identity is not None and known.get(s.uri) == dict(s.identity) and s.uri not in broken
    }
    rescore: dict[str, set[str]] = {uri: set() for uri in unchanged}
    still: list[tuple[str, str]] = []
    for key, shard in zip(before.column("key").to_pylist(), before.column("shard").to_pylist()):
        if shard in unchanged:
            if key in excluded:
                still.append((key, shard))
            else:
                rescore[shard].add(key)
    reused = {uri: frozenset(keys) for uri, keys in rescore.items()}
    rescored = sum(len(keys) for keys in reused.values())
    reason = f"reusing {len(reused)} of {len(inputs.shards)} shards from {previous.run_id}" + (
        f" ({rescored} keys it excluded are scored again)" if rescored else ""
    )
    return ReusePlan(source, previous.run_id, reused, tuple(still), reason)


def _incompatible(previous: Manifest, inputs: QueryInputs) -> str | None:
    """Why the previous run's rows cannot stand for this run's, or ``None``."""
    before = previous.inputs
    if before["checkpoint_sha256"] != inputs.checkpoint_sha256:
        was, now = before["checkpoint_sha256"][:12], inputs.checkpoint_sha256[:12]
        return f"the checkpoint changed (sha256 {was}... -> {now}...)"
    params = before["strategy"].get("params", {})
    for name in SCORE_PARAMS:
        if params.get(name) != inputs.strategy_params.get(name):
            return f"{name} changed ({params.get(name)!r} -> {inputs.strategy_params.get(name)!r})"
    if before.get("subset", {}).get("size") is not None:
        return "it scored a random subset"
    if previous.shards is None:
        return "it has no shards record (committed before incremental runs)"
    now = software_versions()
    for package in _SCORING_PACKAGES:
        if previous.software.get(package) != now[package]:
            return f"it was scored with {package} {previous.software.get(package)}, this is {now[package]}"
    return None


def iter_reused_rows(
    plan: ReusePlan, storage_options: Mapping[str, Any] | None = None, batch_size: int = 65_536
) -> Iterator[pa.Table]:
    """The source run's score rows of the reused shards, as tables in the scores schema."""
    if plan.source is None or not plan.reused:
        return
    for batch in iter_scores(plan.source, storage_options, batch_size=batch_size, shards=plan.reused):
        yield pa.Table.from_batches([batch])


def shard_records(
    inputs: QueryInputs,
    plan: ReusePlan,
    rows_reused: Mapping[str, int],
    rows_scored: Mapping[str, int],
) -> list[dict[str, Any]]:
    """The manifest's ``shards`` list: one record per shard of the pool, in read order.

    Args:
        inputs: This run's inputs (shard URIs, sizes, identities).
        plan: The reuse plan the run followed.
        rows_reused: Shard URI -> rows copied from ``plan.source`` into ``scores/``.
        rows_scored: Shard URI -> rows that came out of this run's scoring pipeline.

    Returns:
        ``uri``, ``samples``, ``bytes``, ``identity``, ``reused_from`` (run id or ``None``),
        ``rows_reused``, ``rows_scored`` per shard.
    """
    return [
        {
            "uri": s.uri,
            "samples": s.samples,
            "bytes": s.bytes,
            "identity": dict(s.identity) if s.identity is not None else None,
            "reused_from": plan.source_id if s.uri in plan.reused else None,
            "rows_reused": int(rows_reused.get(s.uri, 0)),
            "rows_scored": int(rows_scored.get(s.uri, 0)),
        }
        for s in inputs.shards
    ]
