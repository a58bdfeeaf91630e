"""Step 6 of a query: commit the run's tables and manifest, and print its one-line summary."""

from __future__ import annotations

from pipeline.config import config_to_dict
from pipeline.manifest import Manifest, RunState, commit_run
from pipeline.manifest.incremental import ReusePlan, shard_records
from pipeline.proxy import proxy_record
from ray_jobs._shared.querying._merge import Scored
from ray_jobs._shared.querying._spec import PreparedQuery, QuerySpec

__all__ = ["commit", "report"]


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
