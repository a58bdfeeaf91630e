"""The main job: score a pool with a trained checkpoint on Ray, select the exact top-k, commit a
selection manifest to object storage.

    lplgrad query pool=runs/pools/unlabeled checkpoint=runs/train/RUN/checkpoint_... k=1000
    python -m ray_jobs.query --config configs/query/nightly.yaml run_id=2026-11-21
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.query --config configs/query/nightly.yaml actors=8 gpus_per_actor=1

Pipeline: shards are read by Ray Data (`read_webdataset`, no default decoder) and decoded in CPU
tasks; keys already labeled or selected by earlier manifests are dropped in the read tasks, before
decoding, and recorded there for the manifest's count (ray_jobs/_shared/row_filters.py); an actor
pool of `RowScorer`s (model loaded once per actor) scores batches with one forward and one
backward; the driver streams the rows to `scores/` parquet parts under its own attempt directory
and selects (`pipeline.acquisition.select_streamed`: the exact top-k, ties by key, in O(k)
memory, or a stochastic draw), writes `selection.parquet`, `errors.parquet`,
`excluded.parquet` beside them and commits by creating `manifest.json` exclusively (one attempt
wins; docs/manifest.md). Every input is checked before Ray starts (`check_before_ray`); a user
error ends as one line, exit code 2 (ray_jobs/_shared/errors.py).

Incremental (`incremental=true`, the default; never with `subset`): shards whose identity (size
plus ETag or mtime) is unchanged since the previous committed run under `out`, scored with the
same checkpoint hash and `norm`, are not read: that run's rows for them are copied into this
run's `scores/` and go through the same exclusion, top-k and summary path as fresh rows; only
new or changed shards are scored (pipeline/manifest/incremental.py, docs/manifest.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import ray

from pipeline.acquisition import SelectionSpec, StreamedSelection, select_streamed
from pipeline.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_from_checkpoint,
    checkpoint_digest,
    fetch_checkpoint,
    load_checkpoint,
    scoring_model,
)
from pipeline.config import config_to_dict
from pipeline.manifest import (
    Manifest,
    PoolShard,
    QueryInputs,
    begin_run,
    commit_run,
    keys_digest,
    new_run_id,
    previous_run,
    previously_selected_keys,
    resolve_run,
)
from pipeline.manifest.incremental import ReusePlan, iter_reused_rows, plan_reuse, shard_identities, shard_records
from pipeline.pools import ResolvedPool, resolve_pool, spec_for_model
from pipeline.proxy.extraction import feature_batch
from pipeline.proxy.store import FeatureStore, FeatureStoreError, open_store
from pipeline.scoring import NORMS, RowScorer
from pipeline.storage import arrow_filesystem, check_storage, check_writable, filesystem_for, is_local, uri_prefix
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.pool_data import read_pool, read_pool_raw
from ray_jobs._shared.progress import Progress
from ray_jobs._shared.row_filters import ExcludedRows, ExcludedRowSet, drop_excluded, prefilter_raw, store_prefilter


@dataclass(frozen=True)
class QueryConfig:
    pool: str = ""  # with features=, default: the pool the store was extracted from
    checkpoint: str = ""
    features: str | None = None  # proxy mode: the feature store a proxy checkpoint scores from
    strategy: str = "lplgrad"
    k: int = 1000
    exclude_labeled: str | None = None  # a labeled pool: its keys are never selected
    exclude_manifests: tuple[str, ...] = ()  # earlier runs (or output roots, via LATEST)
    out: str = "runs/query"
    run_id: str | None = None  # default: a UTC timestamp; nightly runs pass the date
    batch_size: int = 128
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    subset: int | None = None  # score a random subset of about this many samples (paper: 10k)
    stochastic: str | None = None  # power | softmax | softrank (stochastic batch acquisition)
    beta: float = 1.0
    seed: int = 0
    norm: str = "per_tensor_sum"
    storage_options: dict[str, Any] = field(default_factory=dict)
    incremental: bool = True  # copy unchanged shards' rows from the previous run under `out` (not with subset)
    fail_once_after_batches: int | None = None  # fault drill: one actor dies once after N batches
    address: str | None = None

    def __post_init__(self) -> None:
        if not (self.pool or self.features) or not self.checkpoint:
            raise ValueError("pool (or, for a proxy, features) and checkpoint are required (pool=URI checkpoint=URI)")
        self.selection()  # the spec checks strategy, k and the stochastic draw
        if self.batch_size <= 0 or self.actors <= 0:
            raise ValueError("batch_size and actors must be positive")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"subset must be positive, got {self.subset}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is unknown; choose one of {', '.join(NORMS)}")

    def selection(self) -> SelectionSpec:
        """What the job selects; the manifest records this same spec (`QueryInputs.for_selection`)."""
        return SelectionSpec(self.strategy, self.k, self.stochastic, self.beta, self.seed)


# -- actors ----------------------------------------------------------------------------------


class QueryScorer(RowScorer):
    """RowScorer plus the fault drill: with `fail_after`, the first actor to reach that many
    batches exits hard once (a marker file keeps its restart from failing again)."""

    def __init__(self, build, norm: str, fail_after: int | None = None, marker: str | None = None) -> None:
        super().__init__(build, norm=norm)
        self.batches, self.fail_after, self.marker = 0, fail_after, marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.fail_after is not None and self.batches > self.fail_after and self.marker:
            import os

            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().__call__(batch)


class ProxyQueryScorer(QueryScorer):
    """QueryScorer on feature-store rows (pyarrow batches): features stand in for images."""

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return super().__call__(feature_batch(batch))


# -- driver ----------------------------------------------------------------------------------


def exclusion_run(uri: str, config: QueryConfig) -> str | None:
    """A run directory as given, or for an output root the newest committed run before this one."""
    fs, path = filesystem_for(uri, config.storage_options)
    if fs.exists(f"{path.rstrip('/')}/manifest.json"):
        return resolve_run(uri, config.storage_options)
    earlier = previous_run(uri, str(config.run_id), config.storage_options)
    print(
        f"excluding selections of {earlier}"
        if earlier
        else f"no committed run under {uri} before {config.run_id}: nothing to exclude from it"
    )
    return earlier


def storage_uris(config: QueryConfig) -> list[tuple[str, str]]:
    """(what, URI) of every location the job reads or writes, for the checks before Ray."""
    named = [
        ("pool", config.pool),
        ("checkpoint", config.checkpoint),
        ("features", config.features or ""),
        ("output prefix", config.out),
        ("exclude_labeled", config.exclude_labeled or ""),
    ]
    named += [("exclude_manifests", uri) for uri in config.exclude_manifests]
    return [(what, uri) for what, uri in named if uri]


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_before_ray` found, read without Ray; :func:`prepare` builds on it."""

    pool: ResolvedPool
    classes: tuple[str, ...]  # the checkpoint's, equal to the pool's when the pool has a class list
    checkpoint: Checkpoint
    store: FeatureStore | None  # a proxy checkpoint's feature store
    identities: Mapping[str, Any]  # shard path -> what the storage says about its version
    checkpoint_sha256: str
    exclusion_runs: tuple[str, ...]  # resolved run directories
    excluded: frozenset[str]  # keys those runs selected


@dataclass(frozen=True)
class PreparedQuery:
    """Everything scoring needs, fixed before it starts (:func:`prepare`)."""

    pool: ResolvedPool
    classes: tuple[str, ...]
    checkpoint: Checkpoint
    store: FeatureStore | None
    excluded: frozenset[str]  # keys never scored nor selected: exclusion runs and the labeled pool
    inputs: QueryInputs  # what the manifest records and fingerprints


def check_before_ray(config: QueryConfig) -> CheckedInputs:
    """Everything that can be checked without Ray, in the order a person would fix it: every
    object-store URI answers with these credentials (one request each), the checkpoint loads and
    its weights fit its model, the pool resolves, is not empty and has the checkpoint's classes,
    the output is writable, the exclusions resolve.

    Raises:
        CheckpointError, PoolError, FeatureStoreError, ManifestError, ValueError, OSError: one line each.
    """
    for what, uri in storage_uris(config):
        check_storage(uri, config.storage_options, what=what)
    local_checkpoint = fetch_checkpoint(config.checkpoint, config.storage_options)
    checkpoint = load_checkpoint(local_checkpoint)
    store = proxy_store(config, checkpoint)
    pool = resolve_pool(config.pool or store.pool_uri, config.storage_options)
    classes = tuple(checkpoint.classes)
    if pool.classes is not None and tuple(pool.classes) != classes:
        raise CheckpointError(
            f"checkpoint classes {list(classes)} differ from the pool's {list(pool.classes)} "
            "(query with a checkpoint trained on this pool's classes)"
        )
    build_from_checkpoint(checkpoint, len(classes))  # weights must fit the recorded model now, not in an actor
    identities = shard_identities(pool.fs, [s.path for s in pool.shards])
    if store is not None:
        check_store_fresh(store, {s.uri: identities[s.path] for s in pool.shards})
    check_writable(config.out, config.storage_options, what="output prefix")
    if config.exclude_labeled:
        resolve_pool(config.exclude_labeled, config.storage_options)  # resolvable and not empty; read after Ray starts
    exclusion_runs = tuple(run for uri in config.exclude_manifests if (run := exclusion_run(uri, config)) is not None)
    excluded = frozenset(previously_selected_keys(exclusion_runs, config.storage_options))
    checked = CheckedInputs(
        pool, classes, checkpoint, store, identities, checkpoint_digest(local_checkpoint), exclusion_runs, excluded
    )
    if config.run_id and not config.exclude_labeled:  # the fingerprint is known without Ray: a conflict fails now
        begin_run(config.out, config.run_id, prepare(config, checked).inputs.fingerprint(), config.storage_options)
    return checked


def prepare(config: QueryConfig, checked: CheckedInputs | None = None) -> PreparedQuery:
    """Everything that can fail before scoring: :func:`check_before_ray`, then the labeled pool's
    keys (read with Ray Data) and the run's inputs."""
    checked = checked if checked is not None else check_before_ray(config)
    pool, store = checked.pool, checked.store
    excluded = set(checked.excluded)
    if config.exclude_labeled:
        raw = read_pool_raw(config.exclude_labeled, storage_options=config.storage_options)
        if raw.dataset is not None:
            excluded.update(
                k
                for batch in raw.dataset.select_columns(["__key__"]).iter_batches(batch_format="pyarrow")
                for k in batch.column("__key__").to_pylist()
            )
    inputs = QueryInputs.for_selection(
        config.selection(),
        {"norm": config.norm},  # a scoring parameter: reuse of earlier scores depends on it
        pool_uri=config.pool or store.pool_uri,
        shards=tuple(PoolShard(s.uri, s.samples, s.bytes, checked.identities[s.path]) for s in pool.shards),
        checkpoint_uri=config.checkpoint,
        checkpoint_sha256=checked.checkpoint_sha256,
        exclusion_runs=checked.exclusion_runs,
        excluded_keys_sha256=keys_digest(excluded) if excluded else None,
        excluded_keys_count=len(excluded),
        subset_size=config.subset,
        subset_seed=config.seed,
        features=None
        if store is None
        else {"store": config.features, "backbone_sha256": store.backbone.sha256, "committed_at": store.committed_at},
    )
    return PreparedQuery(pool, checked.classes, checked.checkpoint, store, frozenset(excluded), inputs)


def proxy_store(config: QueryConfig, checkpoint: Checkpoint) -> FeatureStore | None:
    """The feature store a proxy checkpoint scores from (None for a backbone checkpoint),
    checked against what the proxy was trained on."""
    if checkpoint.proxy is None:
        if config.features:
            raise CheckpointError(
                f"features= is for proxy checkpoints (lplgrad proxy); {config.checkpoint} is a backbone checkpoint"
            )
        return None
    if not config.features:
        raise CheckpointError(
            f"{config.checkpoint} is a proxy checkpoint: pass features=FEATURE_STORE (made by lplgrad features)"
        )
    store = open_store(config.features, config.storage_options)
    trained_on = checkpoint.proxy.backbone_sha256
    if trained_on != store.backbone.sha256:
        raise CheckpointError(
            f"the proxy was trained on features of backbone {str(trained_on)[:12]}, but {config.features} holds "
            "backbone "
            f"{store.backbone.sha256[:12]}: retrain the proxy on this store, or query a store of its backbone"
        )
    return store


def check_store_fresh(store: FeatureStore, identities: Mapping[str, Any]) -> None:
    """A proxy query must see the whole pool as it is now: refuse a store that misses shards or
    holds older versions of them."""
    recorded = {s.uri: s.identity for s in store.shards}
    stale = [
        uri
        for uri, identity in identities.items()
        if uri not in recorded or identity is None or recorded[uri] != identity
    ]
    gone = [uri for uri in recorded if uri not in identities]
    if stale or gone:
        raise FeatureStoreError(
            f"feature store {store.uri} is stale: {len(stale)} shards new or changed since extraction, {len(gone)} "
            "gone "
            f"(e.g. {(stale + gone)[:3]}); run `lplgrad features pool={store.pool_uri} out={store.uri} ...` again "
            "(unchanged shards are not re-extracted)"
        )


def reuse_plan(config: QueryConfig, prepared: PreparedQuery) -> ReusePlan:
    """Which shards take their rows from the previous committed run under `out`."""
    if not config.incremental:
        return ReusePlan(reason="incremental=false: every shard is scored")
    if prepared.store is not None:
        return ReusePlan(
            reason="proxy query: every row is scored from the feature store (the store itself is incremental)"
        )
    source = previous_run(config.out, str(config.run_id), config.storage_options)
    return plan_reuse(source, prepared.inputs, prepared.excluded, config.storage_options)


def reused_rows(
    config: QueryConfig, prepared: PreparedQuery, plan: ReusePlan, excluded: ExcludedRowSet
) -> Iterator[pa.Table]:
    """The copied rows without tonight's exclusions, whose (key, shard) go to `excluded`, as the
    read tasks record the fresh rows they drop."""
    for table in iter_reused_rows(plan, config.storage_options):
        kept, dropped = drop_excluded(table, prepared.excluded)
        excluded.add(dropped)
        yield kept


def score_stream(
    config: QueryConfig,
    prepared: PreparedQuery,
    plan: ReusePlan | None = None,
    excluded_rows: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset | None:
    """The lazy Ray Data pipeline: read, subset, exclude, decode, score (None: nothing to score).

    Excluded rows are dropped in the read tasks, before decoding, and recorded in `excluded_rows`
    (an `ExcludedRows` actor, required when `prepared.excluded` is not empty), which the caller
    reads once the pipeline is exhausted.
    """
    plan = plan or ReusePlan()
    if prepared.excluded and excluded_rows is None:
        raise ValueError("a query with exclusions needs excluded_rows (an ExcludedRows actor) to count them in")
    if prepared.store is not None:
        return proxy_score_stream(config, prepared, excluded_rows)
    shards = prepared.pool.shards
    to_score = plan.to_score([s.uri for s in shards])
    if not to_score:
        return None
    # Reused shards with keys their source excluded are read for those keys only.
    only = {s.path: plan.reused[s.uri] for s in shards if plan.reused.get(s.uri)}
    # No num_classes: a query ignores labels (they do not change a score), so a stray `cls` in a pool
    # without an index never makes a sample unscoreable; an index's class list is still checked
    # (read_pool), as docs/pools.md says.
    spec = spec_for_model(prepared.checkpoint.model_name, in_channels=prepared.checkpoint.in_channels)
    total = prepared.pool.num_samples
    fraction = None
    if config.subset is not None:
        if total is None:
            total = sum(s.samples or 0 for s in prepared.pool.shards) or None
        if total is None:  # a pool without index: count it once (keys only, no decoding)
            total = read_pool_raw(config.pool, storage_options=config.storage_options).dataset.count()
        fraction = min(1.0, config.subset / total)
    prefilter = None
    if prepared.excluded or fraction is not None or only:
        prefilter = functools.partial(
            prefilter_raw,
            excluded=prepared.excluded,
            fraction=fraction,
            seed=config.seed,
            only=only,
            excluded_rows=excluded_rows,
            shard_prefix=uri_prefix(prepared.pool.fs),
        )
    data = read_pool(
        config.pool,
        spec,
        storage_options=config.storage_options,
        on_bad_shard="error_row",
        batch_size=config.batch_size,
        prefilter=prefilter,
        shards=to_score if len(to_score) < len(shards) else None,
    )
    marker = None
    if config.fail_once_after_batches is not None:
        marker = f"{config.out.rstrip('/')}/.actor-failure-drill" if "://" not in config.out else None
    return data.drop_columns(["label", "meta"]).map_batches(
        QueryScorer,
        fn_constructor_args=(
            functools.partial(scoring_model, config.checkpoint, config.storage_options, len(prepared.classes)),
        ),
        fn_constructor_kwargs={"norm": config.norm, "fail_after": config.fail_once_after_batches, "marker": marker},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=config.batch_size,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )


def read_store_files(files: list[str], filesystem: Any) -> ray.data.Dataset:
    """The store's parquet files as a dataset, through Ray Data's V1 parquet reader.

    Ray 2.60's default (V2) reader first runs a ListFiles task that took 5.3 of 5.5 seconds for a
    2,000-row store here, whatever the store's size: most of a nightly proxy query. The store
    already names its files, so nothing needs listing. `read_parquet` picks its reader from the
    context when called, so the switch is scoped to this call.
    """
    context = ray.data.DataContext.get_current()
    previous = getattr(context, "use_datasource_v2", None)
    if previous is not None:
        context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, filesystem=filesystem, num_cpus=0.25, override_num_blocks=len(files))
    finally:
        if previous is not None:
            context.use_datasource_v2 = previous


def proxy_score_stream(
    config: QueryConfig, prepared: PreparedQuery, excluded_rows: ray.actor.ActorHandle | None = None
) -> ray.data.Dataset | None:
    """The proxy pipeline: feature-store parquet -> current rows, subset, exclusions (recorded in
    `excluded_rows`, as in :func:`score_stream`) -> head scoring."""
    store = prepared.store
    files = store.files()
    if not files:
        return None
    fraction = None if config.subset is None else min(1.0, config.subset / max(store.num_rows, 1))
    fs, _ = filesystem_for(store.uri, config.storage_options)
    data = read_store_files(files, None if is_local(fs) else arrow_filesystem(fs))
    data = data.map_batches(
        store_prefilter,
        batch_format="pyarrow",
        num_cpus=0.25,
        fn_kwargs={
            "current": store.current,
            "excluded": prepared.excluded,
            "fraction": fraction,
            "seed": config.seed,
            "excluded_rows": excluded_rows,
        },
    )
    return data.map_batches(
        ProxyQueryScorer,
        fn_constructor_args=(
            functools.partial(scoring_model, config.checkpoint, config.storage_options, len(prepared.classes)),
        ),
        fn_constructor_kwargs={"norm": config.norm},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )


def select(
    config: QueryConfig,
    run,
    rows: ray.data.Dataset | None,
    reused: Iterable[pa.Table] = (),
    progress: Progress | None = None,
) -> Selected:
    """Stream the scored rows (copied ones first, then the pipeline's) through the library's
    selection (`pipeline.acquisition.select_streamed`) into the run's `scores/`."""
    arrival = _Arrival()
    fresh = arrival.watch(_scored_batches(rows))
    with run.scores_writer() as writer:
        streamed = select_streamed(
            config.selection(), _counted(fresh, progress), writer, reused=_counted(reused, progress)
        )
    return Selected(streamed, arrival.first)


@dataclass(frozen=True)
class Selected:
    """What :func:`select` found: the library's result plus what only the job knows."""

    streamed: StreamedSelection
    first_scored_at: float | None  # perf_counter of the first scored batch: pipeline and actors up


class _Arrival:
    """Notes when the first scored batch arrives (the pipeline and the actors are up by then)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def watch(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for batch in batches:
            if self.first is None:
                self.first = time.perf_counter()
            yield batch


def _counted(batches: Iterable[pa.Table], progress: Progress | None) -> Iterator[pa.Table]:
    for batch in batches:
        if progress is not None:
            progress.update(batch.num_rows)
        yield batch


def _scored_batches(rows: ray.data.Dataset | None) -> Iterator[pa.Table]:
    """The pipeline's rows, already in the scores schema."""
    if rows is not None:
        yield from rows.iter_batches(batch_size=4096, batch_format="pyarrow")


def with_run_id(config: QueryConfig) -> QueryConfig:
    """The config with its run id (a UTC timestamp when none was given)."""
    return config if config.run_id else dataclasses.replace(config, run_id=new_run_id())


def run(config: QueryConfig, checked: CheckedInputs | None = None) -> Manifest:
    """Run the query; returns the committed manifest (or the existing one for a no-op re-run).

    Args:
        config: The job's config.
        checked: What :func:`check_before_ray` returned for this config (run again when ``None``).
    """
    config = with_run_id(config)
    # Records what the read tasks drop. Started first: its worker process (seconds on a small
    # machine) then starts while the labeled pool's keys are read, not while read tasks wait on it.
    in_tasks = ExcludedRows.remote() if config.exclude_labeled or config.exclude_manifests else None
    prepared = prepare(config, checked)
    state = begin_run(config.out, config.run_id, prepared.inputs.fingerprint(), config.storage_options)
    print(state.message)
    if state.already_committed:
        return state.committed
    if not prepared.excluded:
        in_tasks = None  # nothing to drop: the actor ends with its last handle
    plan = reuse_plan(config, prepared)
    print(plan.reason)
    start = time.perf_counter()
    expected = prepared.pool.num_samples if prepared.store is None and config.subset is None else None
    excluded = ExcludedRowSet()  # every pool row an exclusion dropped, once
    excluded.add(plan.still_excluded)  # reused shards' keys the source excluded too: never read
    with Progress("score", expected, "rows", min_interval=10.0) as progress:  # a bar, or a line per 10 s
        result = select(
            config,
            state,
            score_stream(config, prepared, plan, in_tasks),
            reused_rows(config, prepared, plan, excluded),
            progress=progress,
        )
        if in_tasks is not None:  # the pipeline is exhausted: every task has recorded its rows
            excluded.add(ray.get(in_tasks.rows.remote()))
        if dropped := len(excluded) - len(plan.still_excluded):
            progress.update(dropped, note="excluded")  # rows of the pool read and dropped, not scored
    elapsed = time.perf_counter() - start
    streamed = result.streamed
    selection = streamed.selected
    if len(selection) < config.k:
        print(f"k={config.k} is larger than the {len(selection)} scoreable samples: selecting all of them")
    fresh, copied = sum(streamed.scored_rows.values()), sum(streamed.reused_rows.values())
    # Rows through the scoring actors per second over the whole streaming phase, start-up included:
    # timing from the first batch would flatter the rate, since Ray Data delivers scored batches
    # in bursts. The time to the first scored batch (an upper bound on start-up) is reported apart.
    first = result.first_scored_at
    startup = (first - start) if first is not None else elapsed
    rate = fresh / elapsed if elapsed > 0 else 0.0
    manifest = commit_run(
        state,
        prepared.inputs,
        selection,
        streamed.errors,
        scored=streamed.scored,
        excluded=len(excluded),
        summary=streamed.summary,
        extra={
            "samples_per_s": rate,
            "seconds": elapsed,
            "first_batch_s": startup,
            "config": config_to_dict(config),
            "mode": "proxy" if prepared.store is not None else "full",
            **proxy_record(prepared),
        },
        excluded_rows=excluded.rows(),
        shards=shard_records(prepared.inputs, plan, streamed.reused_rows, streamed.scored_rows),
        reuse=plan.to_dict(),
    )
    if manifest.attempt != state.attempt_id:
        print(
            f"run {state.run_id} was committed meanwhile by attempt {manifest.attempt} with the same inputs: "
            "this attempt's files were discarded"
        )
        return manifest
    copied_from = f" and copied {copied} from {plan.source_id}" if plan.source_id else ""
    unreadable = sorted({shard for key, shard, _ in streamed.errors if key is None})
    nothing = "; nothing was scoreable: see errors.parquet for why" if not streamed.scored else ""
    print(
        f"scored {fresh} rows at {rate:.1f} rows/s{copied_from}, "
        f"selected {len(selection)}, errors {len(streamed.errors)} (unreadable shards {len(unreadable)}), "
        f"excluded {len(excluded)}, manifest {state.run_uri}/manifest.json{nothing}"
    )
    return manifest


def proxy_record(prepared: PreparedQuery) -> dict[str, Any]:
    """What the manifest says about a proxy query (nothing for a full-model one)."""
    if prepared.store is None:
        return {}
    proxy = prepared.checkpoint.proxy
    return {
        "proxy": {
            "kind": proxy.kind,
            "feature_store": prepared.store.uri,
            "backbone_sha256": prepared.store.backbone.sha256,
            "backbone_source": prepared.store.backbone.source,
            "trained_on_store": proxy.feature_store,
        }
    }


def start(config: QueryConfig) -> None:
    """`lplgrad query`: every input is checked in seconds, before Ray starts; then join and run."""
    config = with_run_id(config)
    checked = check_before_ray(config)
    print(connect(config.address))
    guard_driver(
        [
            ("pool", config.pool),
            ("checkpoint", config.checkpoint),
            ("features", config.features),
            ("out", config.out),
            ("exclude_labeled", config.exclude_labeled),
        ],
        config.storage_options,
    )
    run(config, checked)


JOB = Job("query", QueryConfig, start, run, "Score a pool with a checkpoint and commit a selection manifest.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
