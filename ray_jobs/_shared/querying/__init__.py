"""Querying as one typed call: `query(spec)` reads a pool, drops excluded rows, scores, selects and
commits a selection manifest, on the Ray this process has joined.

    from ray_jobs._shared.querying import QuerySpec, check_before_ray, query

    spec = QuerySpec(pool="runs/pools/unlabeled", checkpoint="runs/train/RUN/checkpoint_...", k=1000)
    checked = check_before_ray(spec)  # seconds, no Ray: every input, one line per problem
    manifest = query(spec, checked)   # the committed manifest (or the existing one for a no-op re-run)

The chain, in the order :func:`query` runs it:

1. **check** (:func:`check_before_ray`, no Ray; _prepare.py, the spec in _spec.py): storage
   answers, the checkpoint loads and fits its model, the pool resolves with the checkpoint's
   classes, a proxy's feature store is its backbone's and current (``pipeline.proxy``), the output
   is writable, the exclusions resolve (``pipeline.manifest.exclusions``).
2. **prepare** (:func:`prepare`, _prepare.py): the labeled pool's keys (Ray Data), the recorded
   inputs (``pipeline.manifest.query_inputs``); ``begin_run`` decides whether there is anything to do.
3. **read and filter** (:func:`score_stream`, _streams.py): shards are read by Ray Data (no default
   decoder); excluded keys are dropped in the read tasks, before decoding, and recorded there
   (row_filters.py); a proxy query reads its feature store instead (:func:`proxy_score_stream`).
4. **score** (_streams.py): an actor pool of `QueryScorer`s (model loaded once per actor), one
   forward per batch, plus one backward for strategies that read the gradient norm (``lplgrad``),
   plus the last layer's embeddings for the diverse strategies (``badge``, ``cluster-margin``).
   Incremental runs copy unchanged shards' rows from the previous run instead (:func:`reuse_plan`,
   pipeline/manifest/incremental.py).
5. **select** (:func:`score_and_select`, _merge.py): the driver streams rows into the run's
   `scores/` and selects (``pipeline.acquisition.select_streamed``: exact top-k in O(k) memory, a
   stochastic draw, or a diverse strategy's pick from the M smallest-margin candidates gathered in
   M x (C + D) floats).
6. **commit** (:func:`commit`, _commit.py): `selection.parquet`, `errors.parquet`,
   `excluded.parquet` and an exclusively created `manifest.json` (one attempt wins;
   docs/manifest.md); :func:`report` prints one summary line.

Fault drill (tests only): with ``LPLGRAD_FAULT_SCORER_AFTER_BATCHES=N`` in the driver's
environment, the first scoring actor to reach N batches exits hard once; a marker file
``.actor-failure-drill`` under the (local) output root keeps its restart from failing again.
"""

from __future__ import annotations

import time

from pipeline.manifest import Manifest, begin_run
from ray_jobs._shared.capacity import watch_pending
from ray_jobs._shared.progress import Progress, progress_interval
from ray_jobs._shared.querying._commit import commit, report
from ray_jobs._shared.querying._merge import Scored, dropped_parts, score_and_select
from ray_jobs._shared.querying._prepare import check_before_ray, prepare, reuse_plan
from ray_jobs._shared.querying._spec import CheckedInputs, PreparedQuery, QuerySpec, spec_uris, with_run_id
from ray_jobs._shared.querying._streams import FAULT_DRILL_ENV, ProxyQueryScorer, QueryScorer, fault_drill

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
