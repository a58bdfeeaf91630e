"""Step 5 of a query, on the driver: copied rows and the pipeline's scored batches streamed through
the selection into the run's `scores/`, counted on the progress printer; the dropped rows collected."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipeline.acquisition import SelectionSpec, StreamedSelection, select_streamed
from pipeline.manifest import RunState
from pipeline.manifest.incremental import ReusePlan, iter_reused_rows
from pipeline.storage import display_uri, join_path
from ray_jobs._shared.progress import Progress
from ray_jobs._shared.querying._spec import PreparedQuery, QuerySpec
from ray_jobs._shared.querying._streams import score_stream
from ray_jobs._shared.row_filters import DroppedParts, ExcludedRowSet, drop_excluded

__all__ = ["Scored", "dropped_parts", "reused_rows", "score_and_select", "select"]


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


def dropped_parts(spec: QuerySpec, run: RunState) -> DroppedParts:
    """Where this attempt's read tasks record the rows they drop (a scratch folder of the attempt,
    never listed in the manifest; discarded with the attempt)."""
    return DroppedParts(display_uri(run.fs, join_path(run.attempt_path, "dropped")), dict(spec.storage_options))


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
    selection = spec.selection()
    if selection.is_diverse:  # its pick runs once the stream ends, for seconds to minutes: named, not "scoring"
        stage = f"picking {selection.k:,} of the {selection.candidates:,} smallest-margin rows ({selection.strategy})"
        fresh = _then_stage(fresh, progress, stage)
    reused = _staged(reused_rows(spec, prepared, plan, excluded), progress, "reading copied rows")
    streamed = select(selection, run, _counted(fresh, progress), _counted(reused, progress))
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


def _then_stage(batches: Iterable[pa.Table], progress: Progress, stage: str) -> Iterator[pa.Table]:
    yield from batches
    progress.stage(stage)


def _counted(batches: Iterable[pa.Table], progress: Progress) -> Iterator[pa.Table]:
    for batch in batches:
        progress.update(batch.num_rows)
        yield batch


def _scored_batches(rows: ray.data.Dataset | None) -> Iterator[pa.Table]:
    """The pipeline's rows, already in the scores schema."""
    if rows is not None:
        yield from rows.iter_batches(batch_size=4096, batch_format="pyarrow")
