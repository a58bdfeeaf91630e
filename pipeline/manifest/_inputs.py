"""The inputs of a query run, and the fingerprint that decides whether two runs are the same.

Everything that defines a query's result goes into :class:`QueryInputs`; its canonical JSON
(sorted keys, no spaces, ASCII, no NaN) is hashed with sha256 into the manifest's
``inputs_fingerprint``. A reader can recompute it from manifest.json alone::

    hashlib.sha256(json.dumps(m["inputs"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the acquisition and proxy packages import torch; reading a manifest must not
    from pipeline.acquisition.selection import SelectionSpec
    from pipeline.pools import ShardRef
    from pipeline.proxy.store import FeatureStore

__all__ = ["PoolShard", "QueryInputs", "inputs_fingerprint", "keys_digest", "query_inputs"]


@dataclass(frozen=True)
class PoolShard:
    """One pool shard as recorded in the manifest (sizes ``None`` when the pool has no index).

    ``identity`` is what the storage says about the shard's version (``pipeline.manifest.incremental``:
    size plus ETag, or size plus modification time), ``None`` when it says nothing usable.
    """

    uri: str
    samples: int | None = None
    bytes: int | None = None
    identity: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class QueryInputs:
    """Everything that defines a query's result; its canonical JSON is fingerprinted.

    The checkpoint enters by content hash only (a copy elsewhere is the same model); its URI is
    recorded beside the inputs. The pool has no content hash, so it enters by URI, shard list,
    shard sizes and shard identities (ETag or modification time): the same pool copied elsewhere,
    or a shard rewritten in place, counts as different inputs (the safe side). ``exclusion_runs``
    are resolved run directories (not ``{out}`` with LATEST, which moves) and
    ``excluded_keys_sha256`` is :func:`keys_digest` of their keys.
    ``strategy_params`` (seed, stochastic mode, beta, ...) must be JSON-serialisable.

    A query builds its inputs with :meth:`for_selection` from the ``SelectionSpec`` it selects
    with, so that ``strategy``, ``k`` and the selection's params are that spec's; the fields stay
    plain so that any manifest, older ones included, reads back as it was written.
    """

    pool_uri: str
    shards: tuple[PoolShard, ...]
    checkpoint_uri: str
    checkpoint_sha256: str
    strategy: str
    k: int
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    exclusion_runs: tuple[str, ...] = ()
    excluded_keys_sha256: str | None = None
    excluded_keys_count: int = 0
    subset_size: int | None = None
    subset_seed: int = 0
    features: Mapping[str, Any] | None = None  # proxy queries: the feature store and its backbone

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.subset_size is not None and self.subset_size <= 0:
            raise ValueError(f"subset_size must be positive or None, got {self.subset_size!r}")

    @classmethod
    def for_selection(cls, selection: SelectionSpec, score_params: Mapping[str, Any], **fields: Any) -> QueryInputs:
        """The inputs of a query that selects with ``selection``.

        Args:
            selection: Becomes ``strategy``, ``k`` and its params (seed, stochastic, beta).
            score_params: Scoring parameters recorded beside them in ``strategy_params``
                (``norm``: it changes the stored scores, see ``pipeline.manifest.incremental.SCORE_PARAMS``).
            **fields: The other fields.

        Raises:
            ValueError: If a scoring parameter has the name of a selection one.
        """
        params = selection.manifest_params()
        if clash := sorted(set(params) & set(score_params)):
            raise ValueError(f"score_params {clash} are selection params; they come from the selection spec")
        return cls(strategy=selection.strategy, k=selection.k, strategy_params={**params, **score_params}, **fields)

    @property
    def selection(self) -> SelectionSpec:
        """The ``SelectionSpec`` these inputs record."""
        from pipeline.acquisition.selection import SelectionSpec  # deferred: see the TYPE_CHECKING import

        return SelectionSpec.from_manifest(self.strategy, self.k, self.strategy_params)

    def to_dict(self) -> dict[str, Any]:
        """The ``inputs`` object of manifest.json (what the fingerprint covers)."""
        return {
            "pool": {
                "uri": self.pool_uri,
                "shards": [_shard_dict(s) for s in self.shards],
            },
            "checkpoint_sha256": self.checkpoint_sha256,
            "strategy": {"name": self.strategy, "params": dict(self.strategy_params)},
            "k": self.k,
            "exclusions": {
                "runs": list(self.exclusion_runs),
                "keys_sha256": self.excluded_keys_sha256,
                "num_keys": self.excluded_keys_count,
            },
            "subset": {"size": self.subset_size, "seed": self.subset_seed},
            # Only for proxy queries, so that full-model inputs fingerprint as they always did.
            **({"features": dict(self.features)} if self.features is not None else {}),
        }

    def fingerprint(self) -> str:
        """sha256 hex of :meth:`to_dict` (see :func:`inputs_fingerprint`)."""
        return inputs_fingerprint(self.to_dict())


def _shard_dict(shard: PoolShard) -> dict[str, Any]:
    # "identity" only when known, so that inputs without one fingerprint as they always did.
    entry: dict[str, Any] = {"uri": shard.uri, "samples": shard.samples, "bytes": shard.bytes}
    if shard.identity is not None:
        entry["identity"] = dict(shard.identity)
    return entry


def inputs_fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``inputs`` (sorted keys, no spaces, ASCII, no NaN).

    Raises:
        ValueError: If ``inputs`` holds NaN/inf or a value JSON cannot encode.
    """
    try:
        text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"query inputs are not canonical JSON: {err}") from err
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 hex of a key set, independent of order and repeats (JSON of the sorted keys)."""
    return hashlib.sha256(json.dumps(sorted(set(keys)), ensure_ascii=True).encode("ascii")).hexdigest()


def query_inputs(
    selection: SelectionSpec,
    score_params: Mapping[str, Any],
    *,
    pool_uri: str,
    shards: Sequence[ShardRef],
    identities: Mapping[str, Mapping[str, Any] | None],
    checkpoint_uri: str,
    checkpoint_sha256: str,
    exclusion_runs: Sequence[str] = (),
    excluded: Collection[str] = (),
    subset_size: int | None = None,
    subset_seed: int = 0,
    store: FeatureStore | None = None,
) -> QueryInputs:
    """The inputs a query records, from what it resolved before scoring.

    Args:
        selection: What the query selects with (:meth:`QueryInputs.for_selection`).
        score_params: Scoring parameters (``{"norm": ...}``).
        pool_uri: The pool as named (a proxy query: the pool its feature store was extracted from).
        shards: The resolved pool's shards, in read order.
        identities: Shard path -> identity (``pipeline.manifest.shard_identities``).
        checkpoint_uri: The checkpoint as named.
        checkpoint_sha256: Its content hash.
        exclusion_runs: Resolved run directories whose selections are excluded.
        excluded: Every key the query excludes (those runs' and the labeled pool's); enters as
            :func:`keys_digest` and a count.
        subset_size: Samples of the random subset, ``None`` for the whole pool.
        subset_seed: The subset's seed.
        store: A proxy query's feature store, recorded with its backbone and commit time.

    Returns:
        The inputs, fingerprinted into the manifest.
    """
    return QueryInputs.for_selection(
        selection,
        score_params,
        pool_uri=pool_uri,
        shards=tuple(PoolShard(s.uri, s.samples, s.bytes, identities[s.path]) for s in shards),
        checkpoint_uri=checkpoint_uri,
        checkpoint_sha256=checkpoint_sha256,
        exclusion_runs=tuple(exclusion_runs),
        excluded_keys_sha256=keys_digest(excluded) if excluded else None,
        excluded_keys_count=len(excluded),
        subset_size=subset_size,
        subset_seed=subset_seed,
        features=None
        if store is None
        else {"store": store.uri, "backbone_sha256": store.backbone.sha256, "committed_at": store.committed_at},
    )
