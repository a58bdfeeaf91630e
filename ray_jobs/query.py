"""The main job: score a pool with a trained checkpoint on Ray, select the exact top-k, commit a
selection manifest to object storage.

    lplgrad query pool=runs/pools/unlabeled checkpoint=runs/train/RUN/checkpoint_... k=1000
    python -m ray_jobs.query --config configs/query/nightly.yaml run_id=2026-11-21
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m ray_jobs.query --config configs/query/nightly.yaml actors=8 gpus_per_actor=1

The job is config -> checks -> Ray -> `query(spec)` (ray_jobs/_shared/querying/, where the read ->
filter -> score -> select -> commit chain lives, and which simulate and quickstart call too).
Shards are read by Ray Data and decoded in CPU tasks; keys already labeled (`exclude_labeled`) or
selected by earlier manifests (`exclude_manifests`) are dropped in the read tasks, before decoding;
an actor pool scores batches with one forward and one backward; the driver streams the rows to
`scores/` parquet parts under its own attempt directory and selects (the exact top-k, ties by key,
in O(k) memory, or a stochastic draw), writes `selection.parquet`, `errors.parquet`,
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

from ray_jobs._shared.capacity import check_capacity, query_demands
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.querying import QuerySpec, check_before_ray, query, spec_uris, with_run_id

# The job's config is the call's spec: one set of keys for `lplgrad query key=value` and `query(spec)`.
QueryConfig = QuerySpec


def start(config: QueryConfig) -> None:
    """`lplgrad query`: every input is checked in seconds, before Ray starts; then join and run."""
    config = with_run_id(config)
    checked = check_before_ray(config)
    print(connect(config.address))
    guard_driver(spec_uris(config), config.storage_options)
    # Refused before any work when the actors and a read-and-decode task can never all fit.
    check_capacity(query_demands(config.actors, config.cpus_per_actor, config.gpus_per_actor, bool(config.features)))
    manifest = query(config, checked)
    if manifest.counts.scored == 0 and manifest.counts.errors:
        # Committed, so the errors are on record; a non-zero exit makes a nightly schedule's alert fire.
        run = f"{config.out.rstrip('/')}/{manifest.run_id}"
        raise NothingScoredError(
            f"run {manifest.run_id} scored nothing: {manifest.counts.errors} rows or shards could not be read, and "
            f"its error record is committed (`lplgrad manifest show {run}` lists why; fix or drop those shards)"
        )


class NothingScoredError(ValueError):
    """A query committed, but every row it read was an error."""


JOB = Job("query", QueryConfig, start, query, "Score a pool with a checkpoint and commit a selection manifest.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))
