"""What a query is and what is known of it before scoring: the spec (the `query` job's config),
the inputs checked without Ray, the prepared query, and the locations it touches."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.acquisition import SelectionSpec
from pipeline.checkpoint import Checkpoint
from pipeline.manifest import Exclusions, QueryInputs, new_run_id
from pipeline.pools import ResolvedPool
from pipeline.proxy import FeatureStore
from pipeline.scoring import NORMS

__all__ = ["CheckedInputs", "PreparedQuery", "QuerySpec", "spec_uris", "with_run_id"]


@dataclass(frozen=True)
class QuerySpec:
    """One query: what to score with what, what to exclude, where to commit, how many actors.

    The `query` job's config is this class: its keys are the job's `key=value` flags.
    """

    pool: str = ""  # with features=, default: the pool the store was extracted from
    checkpoint: str = ""
    features: str | None = None  # proxy mode: the feature store a proxy checkpoint scores from
    strategy: str = "margin"  # what the README recommends; strategy=lplgrad for LPLgrad
    k: int = 1000
    exclude_labeled: str | None = None  # a labeled pool: its keys are never selected
    exclude_manifests: tuple[str, ...] = ()  # earlier runs (or output roots, via LATEST)
    out: str = "runs/query"
    run_id: str | None = None  # default: a UTC timestamp; nightly runs pass the date
    batch_size: int = 128
    actors: int = 1
    cpus_per_actor: float = 0.5  # beside a read-and-decode task (1), fits a 2-CPU node (docs/cluster.md)
    gpus_per_actor: float = 0.0
    decoders: int | None = None  # read-and-decode tasks at once, each a worker process (default: one per actor)
    subset: int | None = None  # score a random subset of about this many samples (paper: 10k)
    stochastic: str | None = None  # power | softmax | softrank (stochastic batch acquisition)
    beta: float = 1.0
    seed: int = 0
    norm: str = "per_tensor_sum"
    storage_options: dict[str, Any] = field(default_factory=dict)
    incremental: bool = True  # copy unchanged shards' rows from the previous run under `out` (not with subset)
    candidates: int | None = None  # badge, cluster-margin: pick among the M smallest-margin rows (default 2 * k)
    candidate_memory_mb: float | None = None  # their budget, M x (C + D) floats, checked before scoring (default 1024)
    clusters: int | None = None  # cluster-margin's k-means clusters (default ceil(k / 10))
    address: str | None = None

    def __post_init__(self) -> None:
        if not (self.pool or self.features) or not self.checkpoint:
            raise ValueError("pool (or, for a proxy, features) and checkpoint are required (pool=URI checkpoint=URI)")
        self.selection()  # the spec checks strategy, k and the stochastic draw
        if self.batch_size <= 0 or self.actors <= 0 or (self.decoders is not None and self.decoders <= 0):
            raise ValueError("batch_size, actors and decoders must be positive")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"subset must be positive, got {self.subset}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is unknown; choose one of {', '.join(NORMS)}")

    def selection(self) -> SelectionSpec:
        """What the query selects; the manifest records this same spec (`QueryInputs.for_selection`)."""
        return SelectionSpec(
            self.strategy,
            self.k,
            self.stochastic,
            self.beta,
            self.seed,
            self.candidates,
            self.candidate_memory_mb,
            self.clusters,
        )


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_before_ray` found, read without Ray; :func:`prepare` builds on it."""

    pool: ResolvedPool
    classes: tuple[str, ...]  # the checkpoint's, equal to the pool's when the pool has a class list
    checkpoint: Checkpoint
    store: FeatureStore | None  # a proxy checkpoint's feature store
    identities: Mapping[str, Any]  # shard path -> what the storage says about its version
    checkpoint_sha256: str
    exclusions: Exclusions  # earlier runs' selections, resolved


@dataclass(frozen=True)
class PreparedQuery:
    """Everything scoring needs, fixed before it starts (:func:`prepare`)."""

    pool: ResolvedPool
    classes: tuple[str, ...]
    checkpoint: Checkpoint
    store: FeatureStore | None
    excluded: frozenset[str]  # keys never scored nor selected: exclusion runs and the labeled pool
    inputs: QueryInputs  # what the manifest records and fingerprints


def with_run_id(spec: QuerySpec) -> QuerySpec:
    """The spec with its run id (a UTC timestamp when none was given)."""
    return spec if spec.run_id else dataclasses.replace(spec, run_id=new_run_id())


def spec_uris(spec: QuerySpec) -> list[tuple[str, str]]:
    """(config key, URI) of every location the query reads or writes: for the storage checks
    before Ray and the driver's guard after joining it."""
    named = [
        ("pool", spec.pool),
        ("checkpoint", spec.checkpoint),
        ("features", spec.features or ""),
        ("out", spec.out),
        ("exclude_labeled", spec.exclude_labeled or ""),
    ]
    named += [("exclude_manifests", uri) for uri in spec.exclude_manifests]
    return [(key, uri) for key, uri in named if uri]
