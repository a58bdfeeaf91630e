"""Querying as one typed call: `query(spec)` reads a pool, drops excluded rows, scores, selects and
commits a selection manifest, on the Ray this process has joined.

    from ray_jobs._shared.querying import QuerySpec, check_before_ray, query

    spec = QuerySpec(pool="runs/pools/unlabeled", checkpoint="runs/train/RUN/checkpoint_...", k=1000)
    checked = check_before_ray(spec)  # seconds, no Ray: every input, one line per problem
    manifest = query(spec, checked)   # the committed manifest (or the existing one for a no-op re-run)

The chain, in the order :func:`query` runs it:

1. **check** (:func:`check_before_ray`, no Ray): storage answers, the checkpoint loads and fits its
   model, the pool resolves with the checkpoint's classes, a proxy's feature store is its
   backbone's and current (``pipeline.proxy``), the output is writable, the exclusions resolve
   (``pipeline.manifest.exclusions``).
2. **prepare** (:func:`prepare`): the labeled pool's keys (Ray Data), the recorded inputs
   (``pipeline.manifest.query_inputs``); ``begin_run`` decides whether there is anything to do.
3. **read and filter** (:func:`score_stream`): shards are read by Ray Data (no default decoder);
   excluded keys are dropped in the read tasks, before decoding, and recorded there
   (row_filters.py); a proxy query reads its feature store instead (:func:`proxy_score_stream`).
4. **score**: an actor pool of `QueryScorer`s (model loaded once per actor), one forward per
   batch, plus one backward for strategies that read the gradient norm (``lplgrad``), plus the
   last layer's embeddings for the diverse strategies (``badge``, ``cluster-margin``).
   Incremental runs copy unchanged shards' rows from the previous run instead (:func:`reuse_plan`,
   pipeline/manifest/incremental.py).
5. **select** (:func:`select`): the driver streams rows into the run's `scores/` and selects
   (``pipeline.acquisition.select_streamed``: exact top-k in O(k) memory, a stochastic draw, or a
   diverse strategy's pick from the M smallest-margin candidates gathered in M x (C + D) floats).
6. **commit** (:func:`commit`): `selection.parquet`, `errors.parquet`, `excluded.parquet` and an
   exclusively created `manifest.json` (one attempt wins; docs/manifest.md); :func:`report` prints
   one summary line.

Fault drill (tests only): with ``LPLGRAD_FAULT_SCORER_AFTER_BATCHES=N`` in the driver's
environment, the first scoring actor to reach N batches exits hard once; a marker file
``.actor-failure-drill`` under the (local) output root keeps its restart from failing again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline.acquisition import (
    SelectionSpec,
    StreamedSelection,
    check_candidate_memory,
    classifier_head,
    select_streamed,
)
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
    Exclusions,
    Manifest,
    QueryInputs,
    RunState,
    begin_run,
    commit_run,
    new_run_id,
    previous_run,
    query_inputs,
    resolve_exclusions,
)
from pipeline.manifest.incremental import ReusePlan, iter_reused_rows, plan_reuse, shard_identities, shard_records
from pipeline.pools import ResolvedPool, resolve_pool, spec_for_model
from pipeline.proxy import FeatureStore, check_store_fresh, feature_batch, proxy_record, proxy_store
from pipeline.scoring import NORMS, RowScorer
from pipeline.storage import (
    arrow_filesystem,
    check_storage,
    check_writable,
    display_uri,
    filesystem_for,
    is_local,
    join_path,
    uri_prefix,
)
from ray_jobs._shared.capacity import watch_pending
from ray_jobs._shared.pool_data import read_pool, read_pool_raw
from ray_jobs._shared.progress import Progress, progress_interval
from ray_jobs._shared.row_filters import DroppedParts, ExcludedRowSet, drop_excluded, prefilter_raw, store_prefilter

__all__ = [
    "FAULT_DRILL_ENV",
    "CheckedInputs",
    "PreparedQuery",
    "ProxyQueryScorer",
    "QueryScorer",
    "QuerySpec",
    "Scored",
    "check_before_ray",
    "fault_drill",
    "prepare",
    "query",
    "spec_uris",
    "with_run_id",
]

FAULT_DRILL_ENV = "LPLGRAD_FAULT_SCORER_AFTER_BATCHES"
_DRILL_MARKER = ".actor-failure-drill"


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
    cpus_per_actor: float = 0.5  # with a read (0.5) and a decode (1) task, fits a 2-CPU node (docs/cluster.md)
    gpus_per_actor: float = 0.0
    subset: int | None = None  # score a random subset of about this many samples (paper: 10k)
    stochastic: str | None = None  # power | softmax | softrank (stochastic batch acquisition)
    beta: float = 1.0
    seed: int = 0
    norm: str = "per_tensor_sum"
    storage_options: dict[str, Any] = field(default_factory=dict)
    incremental: bool = True  # copy unchanged shards' rows from the previous run under `out` (not with subset)
    candidates: int | None = None  # badge, cluster-margin: pick among the M smallest-margin rows (default 10 * k)
    candidate_memory_mb: float | None = None  # their budget, M x (C + D) floats, checked before scoring (default 1024)
    clusters: int | None = None  # cluster-margin's k-means clusters (default ceil(k / 10))
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


@dataclass(frozen=True)
class Scored:
    """What the streaming phase found (:func:`score_and_select`)."""

    streamed: StreamedSelection  # the selection, the error rows, the rows per shard
    excluded: ExcludedRowSet  # every pool row an exclusion dropped, once
    fresh_scored: int  # rows the scoring actors scored in this run (not copied, not error rows)
    seconds: float  # the whole streaming phase, actor start-up included
    first_batch_s: float  # to the first scored batch: an upper bound on the actors' start-up
    startup_s: float  # from the call to the streaming phase (the labeled keys, the run's inputs)

    @property
    def rows_per_s(self) -> float:
        """The streaming rate: rows scored here over the whole streaming phase, actor start-up
        included (Ray Data delivers scored batches in bursts, so timing from the first batch would
        flatter the rate). The manifest records it as ``extra.samples_per_s``."""
        return self.fresh_scored / self.seconds if self.seconds > 0 else 0.0


# -- the call --------------------------------------------------------------------------------


def query(spec: QuerySpec, checked: CheckedInputs | None = None) -> Manifest:
    """Run a query on the Ray this process has joined.

    Args:
        spec: The query.
        checked: What :func:`check_before_ray` returned for this spec (run again when ``None``).

    Returns:
        The committed manifest (the existing one for a no-op re-run, or the winning attempt's
        when another attempt with the same inputs committed first).

    Raises:
        CheckpointError, PoolError, FeatureStoreError, ManifestError, ValueError, OSError: bad
            input, one line each, before any scoring.
    """
    spec = with_run_id(spec)
    # One printer for every line until the summary: a line at least every interval from here on,
    # naming the stage, and the waiting line when the cluster has nothing free for the pipeline.
    with Progress("query", None, "rows", min_interval=progress_interval(), heartbeat_s=progress_interval()) as progress:
        started = time.perf_counter()
        progress.stage("preparing")
        prepared = prepare(spec, checked)
        run = begin_run(spec.out, spec.run_id, prepared.inputs.fingerprint(), spec.storage_options)
        progress.echo(run.message)
        if run.already_committed:
            return run.committed
        recorder = dropped_parts(spec, run) if prepared.excluded else None
        plan = reuse_plan(spec, prepared)
        progress.echo(plan.reason)
        with watch_pending("query", progress=lambda: progress.done, printer=progress):
            scored = score_and_select(spec, prepared, run, plan, recorder, progress, time.perf_counter() - started)
        progress.stage("committing")
        manifest = commit(spec, prepared, run, plan, scored)
    report(spec, run, plan, scored, manifest)
    return manifest


def dropped_parts(spec: QuerySpec, run: RunState) -> DroppedParts:
    """Where this attempt's read tasks record the rows they drop (a scratch folder of the attempt,
    never listed in the manifest; discarded with the attempt)."""
    return DroppedParts(display_uri(run.fs, join_path(run.attempt_path, "dropped")), dict(spec.storage_options))


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


# -- 1-2. check and prepare ------------------------------------------------------------------


def check_before_ray(spec: QuerySpec) -> CheckedInputs:
    """Everything that can be checked without Ray, in the order a person would fix it: every
    object-store URI answers with these credentials (one request each), the checkpoint loads and
    its weights fit its model, the pool resolves, is not empty and has the checkpoint's classes,
    a proxy's feature store fits the checkpoint and the pool, the output is writable, the
    exclusions resolve. With a run id and no labeled pool, a conflicting committed run fails now.

    Raises:
        CheckpointError, PoolError, FeatureStoreError, ManifestError, ValueError, OSError: one line each.
    """
    for key, uri in spec_uris(spec):
        check_storage(uri, spec.storage_options, what=key)
    local_checkpoint = fetch_checkpoint(spec.checkpoint, spec.storage_options)
    checkpoint = load_checkpoint(local_checkpoint)
    store = proxy_store(checkpoint, spec.checkpoint, spec.features, spec.storage_options)
    pool = resolve_pool(spec.pool or store.pool_uri, spec.storage_options)
    classes = tuple(checkpoint.classes)
    if pool.classes is not None and tuple(pool.classes) != classes:
        raise CheckpointError(
            f"checkpoint classes {list(classes)} differ from the pool's {list(pool.classes)} "
            "(query with a checkpoint trained on this pool's classes)"
        )
    # Weights must fit the recorded model now, not in an actor.
    model = build_from_checkpoint(checkpoint, len(classes))[0]
    check_selection_memory(spec.selection(), model)
    identities = shard_identities(pool.fs, [s.path for s in pool.shards])
    if store is not None:
        check_store_fresh(store, {s.uri: identities[s.path] for s in pool.shards})
    check_writable(spec.out, spec.storage_options, what="out")
    if spec.exclude_labeled:
        resolve_pool(spec.exclude_labeled, spec.storage_options)  # resolvable and not empty; read after Ray starts
    exclusions = resolve_exclusions(spec.exclude_manifests, str(spec.run_id), spec.storage_options)
    for note in exclusions.notes:
        print(note)
    checked = CheckedInputs(
        pool, classes, checkpoint, store, identities, checkpoint_digest(local_checkpoint), exclusions
    )
    if spec.run_id and not spec.exclude_labeled:  # the fingerprint is known without Ray: a conflict fails now
        begin_run(spec.out, spec.run_id, prepare(spec, checked).inputs.fingerprint(), spec.storage_options)
    return checked


def check_selection_memory(selection: SelectionSpec, model: Any) -> None:
    """A diverse selection's candidate set must fit its budget: M x (C + D) floats on the driver,
    C and D read off the model's classifier head.

    Raises:
        CandidateMemoryError: Naming M, C, D, the bytes and the budget.
    """
    if selection.is_diverse:
        head = classifier_head(model)
        check_candidate_memory(selection.candidates, head.out_features, head.in_features, selection.candidate_memory_mb)


def prepare(spec: QuerySpec, checked: CheckedInputs | None = None) -> PreparedQuery:
    """Everything that can fail before scoring: :func:`check_before_ray`, then the labeled pool's
    keys (read with Ray Data) and the run's inputs."""
    checked = checked if checked is not None else check_before_ray(spec)
    excluded = checked.exclusions.keys | labeled_keys(spec)
    inputs = query_inputs(
        spec.selection(),
        # Scoring parameters: reuse of earlier scores depends on them (a run that skipped the
        # backward pass has no gradient norm to lend to one that reads it).
        {"norm": spec.norm, "gradnorm": spec.selection().needs_gradnorm},
        pool_uri=spec.pool or checked.store.pool_uri,
        shards=checked.pool.shards,
        identities=checked.identities,
        checkpoint_uri=spec.checkpoint,
        checkpoint_sha256=checked.checkpoint_sha256,
        exclusion_runs=checked.exclusions.runs,
        excluded=excluded,
        subset_size=spec.subset,
        subset_seed=spec.seed,
        store=checked.store,
    )
    return PreparedQuery(checked.pool, checked.classes, checked.checkpoint, checked.store, excluded, inputs)


def labeled_keys(spec: QuerySpec) -> frozenset[str]:
    """The keys of the labeled pool `exclude_labeled` (none without one), read with Ray Data."""
    if not spec.exclude_labeled:
        return frozenset()
    raw = read_pool_raw(spec.exclude_labeled, storage_options=spec.storage_options)
    if raw.dataset is None:
        return frozenset()
    return frozenset(
        key
        for batch in raw.dataset.select_columns(["__key__"]).iter_batches(batch_format="pyarrow")
        for key in batch.column("__key__").to_pylist()
    )


def reuse_plan(spec: QuerySpec, prepared: PreparedQuery) -> ReusePlan:
    """Which shards take their rows from the previous committed run under `out`."""
    if not spec.incremental:
        return ReusePlan(reason="incremental=false: every shard is scored")
    if prepared.store is not None:
        return ReusePlan(
            reason="proxy query: every row is scored from the feature store (the store itself is incremental)"
        )
    if spec.selection().is_diverse:
        return ReusePlan(
            reason=f"{spec.strategy} reads every row's embeddings, which scores/ does not keep: every shard is scored"
        )
    source = previous_run(spec.out, str(spec.run_id), spec.storage_options)
    return plan_reuse(source, prepared.inputs, prepared.excluded, spec.storage_options)


# -- 3-4. read, filter, score ----------------------------------------------------------------


class QueryScorer(RowScorer):
    """RowScorer plus the fault drill: with `fail_after`, the first actor to reach that many
    batches exits hard once (the `marker` file keeps its restart from failing again)."""

    def __init__(
        self,
        build: Callable[[], tuple[Any, Any, Any]],
        norm: str,
        fail_after: int | None = None,
        marker: str | None = None,
        gradnorm: bool = True,
        embeddings: bool = False,
    ) -> None:
        super().__init__(build, norm=norm, gradnorm=gradnorm, embeddings=embeddings)
        self.batches, self.fail_after, self.marker = 0, fail_after, marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.fail_after is not None and self.batches > self.fail_after and self.marker:
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


def fault_drill(out: str) -> dict[str, Any]:
    """The scorer's fault-drill arguments from :data:`FAULT_DRILL_ENV` ({} when unset). Read in the
    driver: actors' processes do not see the driver's environment.

    Raises:
        ValueError: If the drill is armed with a remote `out` (the marker file must be local).
    """
    after = os.environ.get(FAULT_DRILL_ENV)
    if not after:
        return {}
    if "://" in out:
        raise ValueError(f"{FAULT_DRILL_ENV} needs a local out for its marker file, got out={out}")
    return {"fail_after": int(after), "marker": os.path.join(os.path.abspath(out), _DRILL_MARKER)}


def score_stream(
    spec: QuerySpec, prepared: PreparedQuery, plan: ReusePlan, recorder: DroppedParts | None = None
) -> ray.data.Dataset | None:
    """The lazy Ray Data pipeline: read, subset, exclude, decode, score (None: nothing to score).

    Excluded rows are dropped in the read tasks, before decoding, and recorded as parts under
    `recorder` (required when `prepared.excluded` is not empty), which the caller reads once the
    pipeline is exhausted.
    """
    if prepared.excluded and recorder is None:
        raise ValueError("a query with exclusions needs DroppedParts to record the rows it drops")
    if prepared.store is not None:
        return proxy_score_stream(spec, prepared, recorder)
    shards = prepared.pool.shards
    to_score = plan.to_score([s.uri for s in shards])
    if not to_score:
        return None
    # Reused shards with keys their source excluded are read for those keys only.
    only = {s.path: plan.reused[s.uri] for s in shards if plan.reused.get(s.uri)}
    fraction = subset_fraction(spec, prepared.pool)
    prefilter = None
    if prepared.excluded or fraction is not None or only:
        prefilter = functools.partial(
            prefilter_raw,
            excluded=prepared.excluded,
            fraction=fraction,
            seed=spec.seed,
            only=only,
            dropped_to=recorder,
            shard_prefix=uri_prefix(prepared.pool.fs),
        )
    # No num_classes: a query ignores labels (they do not change a score), so a stray `cls` in a pool
    # without an index never makes a sample unscoreable; an index's class list is still checked
    # (read_pool), as docs/pools.md says.
    data = read_pool(
        spec.pool,
        spec_for_model(prepared.checkpoint.model_name, in_channels=prepared.checkpoint.in_channels),
        storage_options=spec.storage_options,
        on_bad_shard="error_row",
        batch_size=spec.batch_size,
        prefilter=prefilter,
        shards=to_score if len(to_score) < len(shards) else None,
    )
    return score(data.drop_columns(["label", "meta"]), QueryScorer, spec, prepared, fault_drill(spec.out))


def subset_fraction(spec: QuerySpec, pool: ResolvedPool) -> float | None:
    """The fraction of the pool a `subset` query reads (None: the whole pool)."""
    if spec.subset is None:
        return None
    total = pool.num_samples or sum(s.samples or 0 for s in pool.shards) or None
    if total is None:  # a pool without index: count it once (keys only, no decoding)
        total = read_pool_raw(spec.pool, storage_options=spec.storage_options).dataset.count()
    return min(1.0, spec.subset / total)


def score(
    data: ray.data.Dataset,
    scorer: type[QueryScorer],
    spec: QuerySpec,
    prepared: PreparedQuery,
    drill: Mapping[str, Any] | None = None,
    **map_options: Any,
) -> ray.data.Dataset:
    """`data` scored by an actor pool of `scorer`s (the model loaded once per actor)."""
    build = functools.partial(scoring_model, spec.checkpoint, spec.storage_options, len(prepared.classes))
    selection = spec.selection()
    # The backward pass only for strategies that read the gradient norm; embeddings only for diverse ones.
    outputs = {"gradnorm": selection.needs_gradnorm, "embeddings": selection.is_diverse}
    return data.map_batches(
        scorer,
        fn_constructor_args=(build,),
        fn_constructor_kwargs={"norm": spec.norm, **outputs, **(drill or {})},
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
        batch_size=spec.batch_size,
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor,
        **map_options,
    )


def proxy_score_stream(
    spec: QuerySpec, prepared: PreparedQuery, recorder: DroppedParts | None = None
) -> ray.data.Dataset | None:
    """The proxy pipeline: feature-store parquet -> current rows, subset, exclusions (recorded in
    `recorder`, as in :func:`score_stream`) -> head scoring."""
    store = prepared.store
    files = store.files()
    if not files:
        return None
    fraction = None if spec.subset is None else min(1.0, spec.subset / max(store.num_rows, 1))
    fs, _ = filesystem_for(store.uri, spec.storage_options)
    data = read_store_files(files, None if is_local(fs) else arrow_filesystem(fs))
    data = data.map_batches(
        store_prefilter,
        batch_format="pyarrow",
        num_cpus=0.25,
        fn_kwargs={
            "current": store.current,
            "excluded": prepared.excluded,
            "fraction": fraction,
            "seed": spec.seed,
            "dropped_to": recorder,
        },
    )
    return score(data, ProxyQueryScorer, spec, prepared, batch_format="pyarrow")


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


# -- 5. select -------------------------------------------------------------------------------


def score_and_select(
    spec: QuerySpec,
    prepared: PreparedQuery,
    run: RunState,
    plan: ReusePlan,
    recorder: DroppedParts | None,
    progress: Progress,
    startup_s: float = 0.0,
) -> Scored:
    """Stream the copied rows, then the pipeline's, through the selection into the run's `scores/`,
    counting them on `progress` and naming its stage; then collect the rows the exclusions dropped."""
    start = time.perf_counter()
    progress.total = prepared.pool.num_samples if prepared.store is None and spec.subset is None else None
    excluded = ExcludedRowSet()
    excluded.add(plan.still_excluded)  # reused shards' keys the source excluded too: never read
    arrival = _Arrival(progress)
    fresh = arrival.watch(_scored_batches(score_stream(spec, prepared, plan, recorder)))
    reused = _staged(reused_rows(spec, prepared, plan, excluded), progress, "reading copied rows")
    streamed = select(spec.selection(), run, _counted(fresh, progress), _counted(reused, progress))
    if recorder is not None:  # the pipeline is exhausted: every task has written its part
        excluded.add(recorder.read())
    if dropped := len(excluded) - len(plan.still_excluded):
        progress.update(dropped, note="excluded", paced=False)  # rows of the pool read and dropped, not scored
    seconds = time.perf_counter() - start
    first = arrival.first
    return Scored(
        streamed,
        excluded,
        arrival.scored,
        seconds,
        (first - start) if first is not None else seconds,
        startup_s,
    )


def select(
    selection: SelectionSpec, run: RunState, fresh: Iterable[pa.Table], reused: Iterable[pa.Table] = ()
) -> StreamedSelection:
    """Stream scored rows (copied ones first) through the library's selection
    (`pipeline.acquisition.select_streamed`) into the run's `scores/`."""
    with run.scores_writer() as writer:
        return select_streamed(selection, fresh, writer, reused=reused)


def reused_rows(
    spec: QuerySpec, prepared: PreparedQuery, plan: ReusePlan, excluded: ExcludedRowSet
) -> Iterator[pa.Table]:
    """The copied rows without tonight's exclusions, whose (key, shard) go to `excluded`, as the
    read tasks record the fresh rows they drop."""
    for table in iter_reused_rows(plan, spec.storage_options):
        kept, dropped = drop_excluded(table, prepared.excluded)
        excluded.add(dropped)
        yield kept


class _Arrival:
    """Notes when the first scored batch arrives (the pipeline and the actors are up by then) and
    counts the rows that scored; names the stage on `progress`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.first: float | None = None
        self.scored = 0

    def watch(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        # Ray Data starts the read tasks and the actors when the first batch is asked for.
        self.progress.stage("starting actors, reading")
        for batch in batches:
            if self.first is None:
                self.first = time.perf_counter()
                self.progress.stage("scoring")
            self.scored += batch.column("error").null_count  # error rows carry a reason, scored rows none
            yield batch


def _staged(batches: Iterable[pa.Table], progress: Progress, stage: str) -> Iterator[pa.Table]:
    progress.stage(stage)
    yield from batches


def _counted(batches: Iterable[pa.Table], progress: Progress) -> Iterator[pa.Table]:
    for batch in batches:
        progress.update(batch.num_rows)
        yield batch


def _scored_batches(rows: ray.data.Dataset | None) -> Iterator[pa.Table]:
    """The pipeline's rows, already in the scores schema."""
    if rows is not None:
        yield from rows.iter_batches(batch_size=4096, batch_format="pyarrow")


# -- 6. commit and report --------------------------------------------------------------------


def commit(spec: QuerySpec, prepared: PreparedQuery, run: RunState, plan: ReusePlan, scored: Scored) -> Manifest:
    """Write the run's tables and commit its manifest (``pipeline.manifest.commit_run``)."""
    streamed = scored.streamed
    return commit_run(
        run,
        prepared.inputs,
        streamed.selected,
        streamed.errors,
        scored=streamed.scored,
        excluded=len(scored.excluded),
        summary=streamed.summary,
        extra={
            "samples_per_s": scored.rows_per_s,
            "seconds": scored.seconds,
            "first_batch_s": scored.first_batch_s,
            "startup_s": scored.startup_s,
            "select_seconds": streamed.select_seconds,  # inside `seconds`: a diverse pick runs after the stream
            "config": config_to_dict(spec),
            "mode": "proxy" if prepared.store is not None else "full",
            **proxy_record(prepared.checkpoint, prepared.store),
        },
        excluded_rows=scored.excluded.rows(),
        shards=shard_records(prepared.inputs, plan, streamed.reused_rows, streamed.scored_rows),
        reuse=plan.to_dict(),
    )


def report(spec: QuerySpec, run: RunState, plan: ReusePlan, scored: Scored, manifest: Manifest) -> None:
    """Print what the run did, in one line (or why another attempt's manifest stands): the
    manifest's counts, the streaming rate it records, and the start-up apart."""
    streamed = scored.streamed
    counts = manifest.counts
    if counts.selected < spec.k:
        print(f"k={spec.k} is larger than the {counts.selected} scoreable samples: selecting all of them")
    if manifest.attempt != run.attempt_id:
        print(
            f"run {run.run_id} was committed meanwhile by attempt {manifest.attempt} with the same inputs: "
            "this attempt's files were discarded"
        )
        return
    copied = counts.scored - scored.fresh_scored
    copied_from = f", {copied} copied from {plan.source_id}" if plan.source_id else ""
    unreadable = sorted({shard for key, shard, _ in streamed.errors if key is None})
    nothing = "; nothing was scoreable: see errors.parquet for why" if not counts.scored else ""
    print(
        f"scored {counts.scored} rows ({scored.fresh_scored} here at {scored.rows_per_s:.1f} rows/s over the "
        f"{scored.seconds:.1f} s streaming phase, first batch after {scored.first_batch_s:.1f} s{copied_from}), "
        f"selected {counts.selected}, errors {counts.errors} (unreadable shards {len(unreadable)}), "
        f"excluded {counts.excluded}; start-up {scored.startup_s:.1f} s before streaming; "
        f"manifest {run.run_uri}/manifest.json{nothing}"
    )
