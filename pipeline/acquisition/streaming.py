"""A query's selection over a stream of scored rows, on the driver: write every row to the run's
scores table, keep the exact top-k (or a stochastic draw) in O(k) memory, collect error rows and
summarise the acquisition values.

No Ray here: the job hands in an iterable of pyarrow batches (RowScorer output: ``key``,
``shard``, ``error`` and the score columns) and the run's scores writer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pipeline.acquisition._strategies import ScoreRanks, acquisition_values, stochastic_values
from pipeline.acquisition.selection import SelectionSpec, TopK
from pipeline.manifest import ScoreSummary, selection_rows

__all__ = ["ScoresSink", "StreamedSelection", "select_streamed"]

# Columns a scored batch must hold; the score columns a strategy reads come on top.
_ID_COLUMNS = ("key", "shard", "error")


class ScoresSink(Protocol):
    """Where every scored row goes (``pipeline.manifest.ScoresWriter``)."""

    def write(self, batch: pa.Table) -> None: ...

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The written rows back, in order (softrank's second pass); no write after this."""
        ...


@dataclass(frozen=True)
class StreamedSelection:
    """What one pass over a query's scored rows found.

    Attributes:
        selected: ``(key, acquisition value, selection row)`` best first, at most k
            (``TopK.result``); with a stochastic draw the value is the perturbed one it was ranked by.
        summary: Summary of the finite acquisition values of the scored rows.
        errors: ``(key, shard, reason)`` of every error row; key ``None`` for a whole shard.
        scored: Rows that scored (error rows excluded).
        reused_rows: Rows per shard URI that came from the reused (copied) batches, error rows included.
        scored_rows: Rows per shard URI that came from the freshly scored batches, error rows included.
    """

    selected: list[tuple[str, float, dict[str, Any]]]
    summary: ScoreSummary
    errors: list[tuple[str | None, str | None, str]]
    scored: int
    reused_rows: Counter[str]
    scored_rows: Counter[str]


def select_streamed(
    spec: SelectionSpec, scored: Iterable[pa.Table], scores: ScoresSink, reused: Iterable[pa.Table] = ()
) -> StreamedSelection:
    """Stream scored rows (copied ones first, then the fresh ones) into ``scores`` and select.

    Memory is O(k + batch), except for ``softrank``, which keeps one float per scored row to know
    global ranks (:class:`ScoreRanks`) and reads the rows back from ``scores`` for a second pass.

    Args:
        spec: What to select.
        scored: Freshly scored batches (any batching; ``key``, ``shard``, ``error`` plus the
            strategy's score columns).
        scores: Receives every row, reused and fresh, in arrival order.
        reused: Batches copied from an earlier run, in the same schema.

    Returns:
        The :class:`StreamedSelection`.
    """
    if spec.is_diverse:
        raise ValueError(
            f"{spec.strategy} picks from gathered candidates, not by a per-sample top-k: "
            "gather them with CandidateGatherer and select with select_diverse"
        )
    top = TopK(spec.k)
    summary = ScoreSummary()
    ranks = ScoreRanks() if spec.stochastic == "softrank" else None
    errors: list[tuple[str | None, str | None, str]] = []
    rows: dict[str, Counter[str]] = {"reused": Counter(), "scored": Counter()}
    good = 0
    for origin, batch in _tagged(reused, scored):
        batch = _text_columns(batch)
        if not batch.num_rows:
            continue
        rows[origin].update(batch.column("shard").to_pylist())
        scores.write(batch)
        columns, values, failed = _values(spec, batch)
        errors.extend(
            (columns["key"][i], columns["shard"][i], str(columns["error"][i])) for i in np.flatnonzero(failed)
        )
        good += int((~failed).sum())
        summary.add(values[~failed], columns["key"][~failed].tolist())
        if ranks is not None:
            ranks.add(values)  # pass 1 of 2: the draw needs every value's global rank
        else:
            _offer(top, spec, columns, values)
    if ranks is not None:
        for batch in scores.iter_batches():
            columns, values, _ = _values(spec, pa.Table.from_batches([batch]))
            _offer(top, spec, columns, values, ranks.ranks(values))
    return StreamedSelection(top.result(), summary, errors, good, rows["reused"], rows["scored"])


def _tagged(reused: Iterable[pa.Table], scored: Iterable[pa.Table]) -> Iterator[tuple[str, pa.Table]]:
    yield from (("reused", batch) for batch in reused)
    yield from (("scored", batch) for batch in scored)


def _values(spec: SelectionSpec, batch: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(columns as numpy, acquisition values [N] with NaN on error rows, error mask [N])."""
    columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    failed = np.array([e is not None for e in columns["error"]], dtype=bool)
    values = acquisition_values(spec.strategy, columns, seed=spec.seed)
    values[failed] = np.nan
    return columns, values, failed


def _text_columns(batch: pa.Table) -> pa.Table:
    """key, shard and error as strings. A batch of whole-shard error rows only has no key at all,
    and Ray's numpy batches turn that all-None column into NaN floats: read back, they are nulls.

    Raises:
        KeyError: If the batch lacks one of the three columns.
    """
    for name in _ID_COLUMNS:
        column = batch.column(name)
        if not pa.types.is_string(column.type):
            values = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in column.to_pylist()]
            batch = batch.set_column(batch.column_names.index(name), name, pa.array(values, pa.string()))
    return batch


def _offer(
    top: TopK,
    spec: SelectionSpec,
    columns: Mapping[str, np.ndarray],
    values: np.ndarray,
    ranks: np.ndarray | None = None,
) -> None:
    """Offer a batch to the running top-k, building selection rows only for its candidates.

    Args:
        top: The running top-k.
        spec: Its selection (a stochastic one ranks Gumbel-perturbed values).
        columns: The batch's columns, each [N].
        values: Acquisition values [N] (NaN: never selected).
        ranks: Global ranks of ``values`` [N], for ``softrank`` only.
    """
    ranked = values
    if spec.stochastic is not None:
        ranked = stochastic_values(spec.stochastic, values, columns["key"].tolist(), spec.beta, spec.seed, ranks=ranks)
    candidates = _batch_candidates(ranked, spec.k)
    if len(candidates):
        picked = {name: np.asarray(col)[candidates] for name, col in columns.items()}
        top.add(picked["key"].tolist(), ranked[candidates], rows=selection_rows(picked, values[candidates]))


def _batch_candidates(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of a batch that can still enter a global top-k: its own top-k plus ties."""
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) <= k:
        return finite
    threshold = np.partition(values[finite], len(finite) - k)[len(finite) - k]
    return finite[values[finite] >= threshold]
