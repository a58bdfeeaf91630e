"""A pool's penultimate features under a frozen backbone, extracted into a feature store as one
typed call: `extract_features(spec) -> FeatureStore`. `lplgrad features` is this call behind a
command line; simulate calls it directly.

Pipeline: the same read/decode stages as the query job; an actor pool of `FeatureExtractor`s
(backbone loaded once per actor) turns batches into feature rows, which Ray Data writes as
parquet straight from the workers into a new generation of the store; the driver counts rows per
shard from the written files and commits `store.json` last. Incremental (the default): shards
whose identity is unchanged since the store's last commit with the same backbone hash are not
read again.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.checkpoint import build_from_checkpoint, checkpoint_digest, fetch_checkpoint, load_checkpoint
from pipeline.manifest.incremental import shard_identities
from pipeline.models import available_models, create_model
from pipeline.pools import resolve_pool, spec_for_model
from pipeline.proxy.extraction import FeatureExtractor, feature_dim
from pipeline.proxy.store import (
    Backbone,
    FeatureStore,
    StoreShard,
    commit_store,
    count_generation,
    generation_uri,
    new_generation,
    open_store,
    plan_extraction,
)
from pipeline.storage import arrow_filesystem, check_storage, check_writable, filesystem_for, is_local
from ray_jobs._shared.pool_data import read_pool

__all__ = ["FeaturesConfig", "extract_features", "resolve_backbone"]


@dataclass(frozen=True)
class FeaturesConfig:
    pool: str = ""
    out: str = ""  # the feature store
    checkpoint: str | None = None  # a training checkpoint: its backbone
    model: str | None = None  # or a registry model with a local weights file
    weights: str | None = None
    num_classes: int | None = None  # the weights file's classifier size (default: the pool's class count)
    in_channels: int | None = None
    batch_size: int = 256
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    incremental: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.pool or not self.out:
            raise ValueError("pool and out are required (pool=URI out=FEATURE_STORE_URI)")
        if (self.checkpoint is None) == (self.weights is None):
            raise ValueError("name the backbone once: checkpoint=URI, or model=NAME weights=LOCAL_FILE")
        if self.weights is not None and self.model not in available_models():
            raise ValueError(f"weights= needs model= one of {', '.join(available_models())}, got {self.model!r}")
        if self.batch_size <= 0 or self.actors <= 0:
            raise ValueError("batch_size and actors must be positive")

    def uris(self) -> list[tuple[str, str]]:
        """(config key, URI) of every location the extraction reads or writes (the driver's guard checks them)."""
        named = [("pool", self.pool), ("out", self.out), ("checkpoint", self.checkpoint), ("weights", self.weights)]
        return [(key, uri) for key, uri in named if uri]


# -- backbone --------------------------------------------------------------------------------


def checkpoint_backbone(checkpoint: str, storage_options: dict[str, Any]):
    """Runs inside each actor: the checkpoint's model (its LossNet is not needed)."""
    loaded = load_checkpoint(fetch_checkpoint(checkpoint, storage_options))
    return build_from_checkpoint(loaded, len(loaded.classes))


def weights_backbone(model: str, weights: str, num_classes: int, in_channels: int | None):
    return (create_model(model, num_classes=num_classes, in_channels=in_channels, weights=weights),)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_backbone(
    config: FeaturesConfig, num_classes: int | None
) -> tuple[Backbone, Callable[[], tuple[Any, ...]], Any]:
    """(Backbone record, the actors' build function, the decode spec), checked on the driver so a
    bad checkpoint or weights file fails before Ray starts anything."""
    if config.checkpoint is not None:
        local = fetch_checkpoint(config.checkpoint, config.storage_options)
        loaded = load_checkpoint(local)
        if loaded.is_proxy:
            raise ValueError(
                f"{config.checkpoint} is a proxy checkpoint; features come from a backbone checkpoint (lplgrad train)"
            )
        model = build_from_checkpoint(loaded, len(loaded.classes))[0]
        name, in_channels, sha = loaded.model_name, loaded.in_channels, checkpoint_digest(local)
        source, build = (
            config.checkpoint,
            functools.partial(checkpoint_backbone, config.checkpoint, config.storage_options),
        )
    else:
        classes = config.num_classes or num_classes
        if classes is None:
            raise ValueError("the pool has no class list: pass num_classes= (the weights file's classifier size)")
        model = create_model(config.model, num_classes=classes, in_channels=config.in_channels, weights=config.weights)
        name, in_channels, sha, source = (
            config.model,
            config.in_channels,
            file_digest(config.weights),
            str(config.weights),
        )
        build = functools.partial(weights_backbone, config.model, config.weights, classes, config.in_channels)
    backbone = Backbone(sha256=sha, source=source, model=name, dim=feature_dim(model))
    return backbone, build, spec_for_model(name, in_channels=in_channels)


# -- run -------------------------------------------------------------------------------------


def extract_features(config: FeaturesConfig, join: Callable[[], None] | None = None) -> FeatureStore:
    """Extract what is stale and commit the store; returns the committed store.

    Args:
        config: The job's config.
        join: Joins Ray; called once everything checkable without Ray has been checked, and only
            when there is something to extract (``None``: Ray is already up).
    """
    for what, uri in (("pool", config.pool), ("feature store", config.out), ("checkpoint", config.checkpoint)):
        if uri:
            check_storage(uri, config.storage_options, what=what)  # one request each, before anything else
    pool = resolve_pool(config.pool, config.storage_options)
    backbone, build, spec = resolve_backbone(config, len(pool.classes) if pool.classes else None)
    check_writable(config.out, config.storage_options, what="feature store")
    by_path = shard_identities(pool.fs, [s.path for s in pool.shards])
    identities = {s.uri: by_path[s.path] for s in pool.shards}
    previous = open_store(config.out, config.storage_options, missing_ok=True)
    plan = plan_extraction(previous, backbone, config.pool, identities, incremental=config.incremental)
    print(plan.reason)
    generation = new_generation()
    start = time.perf_counter()
    if plan.extract:
        if join is not None:
            join()
        write_generation(config, pool, plan.extract, build, spec, generation, backbone.dim)
    counts = count_generation(config.out, generation, config.storage_options)
    shards = [
        plan.reuse.get(uri) or StoreShard(uri, identities[uri], generation, *counts.get(uri, (0, 0)))
        for uri in identities
    ]
    store = commit_store(
        config.out,
        config.pool,
        backbone,
        shards,
        config.storage_options,
        based_on=previous.sequence if previous is not None else 0,
        generation=generation,
    )
    extracted = sum(rows for rows, _ in counts.values())
    seconds = time.perf_counter() - start
    print(
        f"extracted {extracted} rows from {len(plan.extract)} shards in {seconds:.1f}s "
        f"({extracted / max(seconds, 1e-9):.1f} rows/s), reused {len(plan.reuse)} shards; "
        f"store {config.out}: {store.num_rows} rows, dim {backbone.dim}, backbone {backbone.sha256[:12]}"
    )
    return store


def write_generation(config: FeaturesConfig, pool, shards: list[str], build, spec, generation: str, dim: int) -> None:
    """Read and decode the shards, extract on the actor pool, write parquet from the workers."""
    data = read_pool(
        config.pool,
        spec,
        storage_options=config.storage_options,
        on_bad_shard="error_row",
        batch_size=config.batch_size,
        shards=shards if len(shards) < len(pool.shards) else None,
    )
    rows = data.drop_columns(["label", "meta"]).map_batches(
        FeatureExtractor,
        fn_constructor_args=(build, generation),
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    fs, path = filesystem_for(generation_uri(config.out, generation), config.storage_options)
    # About 64 MiB of features per file: a proxy query reads one file per task, and a store of
    # many tiny files (one per block by default) spends its time scheduling reads.
    rows_per_file = max(1_000, (64 << 20) // (4 * dim))
    rows.write_parquet(path, filesystem=None if is_local(fs) else arrow_filesystem(fs), min_rows_per_file=rows_per_file)
