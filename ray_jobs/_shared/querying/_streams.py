"""Steps 3-4 of a query: the lazy Ray Data pipelines (read, subset, exclude, decode, score; or a
proxy's feature store, head scoring) and the scoring actors they map batches through."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline.checkpoint import scoring_model
from pipeline.manifest.incremental import ReusePlan
from pipeline.pools import ResolvedPool, spec_for_model
from pipeline.proxy import feature_batch
from pipeline.scoring import RowScorer
from pipeline.storage import arrow_filesystem, filesystem_for, is_local, uri_prefix
from ray_jobs._shared.capacity import DECODE_CPUS
from ray_jobs._shared.pool_data import read_pool, read_pool_raw
from ray_jobs._shared.querying._spec import PreparedQuery, QuerySpec
from ray_jobs._shared.row_filters import DroppedParts, prefilter_raw, store_prefilter

__all__ = [
    "FAULT_DRILL_ENV",
    "ProxyQueryScorer",
    "QueryScorer",
    "fault_drill",
    "proxy_score_stream",
    "read_store_files",
    "score",
    "score_stream",
    "subset_fraction",
]


FAULT_DRILL_ENV = "LPLGRAD_FAULT_SCORER_AFTER_BATCHES"
_DRILL_MARKER = ".actor-failure-drill"


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
    decoders = spec.decoders or spec.actors
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
        # Read, filter and decode as one task per shard (equal CPUs fuse them), `decoders` at once:
        # each is a worker process paying its imports first. Blocks of a few batches, so the
        # actors score the first rows while the rest decode.
        read_num_cpus=DECODE_CPUS,
        decode_num_cpus=DECODE_CPUS,
        concurrency=decoders,
        block_rows=4 * spec.batch_size,
    )
    # In the read-and-decode task too (the same CPUs and concurrency fuse it): no stage of its own.
    data = data.drop_columns(["label", "meta"], num_cpus=DECODE_CPUS, compute=ray.data.TaskPoolStrategy(size=decoders))
    return score(data, QueryScorer, spec, prepared, fault_drill(spec.out))


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
