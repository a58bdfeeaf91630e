"""A query's selection over a stream of scored rows, on the driver: write every row to the run's
scores table, keep the exact top-k (or a stochastic draw) in O(k) memory, or for a diverse strategy
(``badge``, ``cluster-margin``) gather the M smallest-margin rows with their embeddings in
M x (C + D) memory and pick from them at the end; collect error rows and summarise the acquisition
values.

No Ray here: the job hands in an iterable of pyarrow batches (RowScorer output: ``key``,
``shard``, ``error`` and the score columns) and the run's scores writer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pipeline.acquisition._strategies import ScoreRanks, acquisition_values, stochastic_values
from pipeline.acquisition.candidates import CandidateGatherer, Candidates, check_candidate_memory
from pipeline.acquisition.diverse import select_diverse
from pipeline.acquisition.selection import SelectionSpec, TopK
from pipeline.manifest import ScoreSummary, selection_rows

__all__ = ["ScoresSink", "StreamedSelection", "select_candidates", "select_streamed"]

# Columns a scored batch must hold; the score columns a strategy reads come on top.
_ID_COLUMNS = ("key", "shard", "error")
# Columns of RowScorer(embeddings=True) that feed the candidate set and never reach scores/.
_EMBEDDING_COLUMNS = ("residual", "penultimate")
# Per-candidate columns kept for the selection table.
_CANDIDATE_EXTRAS = (
    "shard",
    "score",
    "entropy",
    "margin",
    "least_confidence",
    "pred_class",
    "pred_prob",
    "predicted_loss",
)


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
        select_seconds: Wall seconds after the stream ended: a diverse strategy's pick from its
            candidates, softrank's second pass (next to nothing for a top-k, which keeps up as rows arrive).
    """

    selected: list[tuple[str, float, dict[str, Any]]]
    summary: ScoreSummary
    errors: list[tuple[str | None, str | None, str]]
    scored: int
    reused_rows: Counter[str]
    scored_rows: Counter[str]
    select_seconds: float = 0.0


def select_streamed(
    spec: SelectionSpec, scored: Iterable[pa.Table], scores: ScoresSink, reused: Iterable[pa.Table] = ()
) -> StreamedSelection:
    """Stream scored rows (copied ones first, then the fresh ones) into ``scores`` and select.

    Memory is O(k + batch), except for ``softrank``, which keeps one float per scored row to know
    global ranks (:class:`ScoreRanks`) and reads the rows back from ``scores`` for a second pass,
    and for a diverse strategy, which gathers ``spec.candidates`` rows with their embeddings
    (:class:`~pipeline.acquisition.candidates.CandidateGatherer`, M x (C + D) floats) and selects
    from them once the stream ends (:func:`select_candidates`). Its acquisition values (the summary,
    the selection's ``score``) are margin's, ``-margin``; its selection's rank is the pick order.

    Args:
        spec: What to select.
        scored: Freshly scored batches (any batching; ``key``, ``shard``, ``error`` plus the
            strategy's score columns; for a diverse strategy ``margin``, ``residual`` [N, C] and
            ``penultimate`` [N, D], which are not written to ``scores``).
        scores: Receives every row, reused and fresh, in arrival order.
        reused: Batches copied from an earlier run, in the same schema (none for a diverse strategy:
            scores/ holds no embeddings).

    Returns:
        The :class:`StreamedSelection`.

    Raises:
        CandidateMemoryError: When the candidate set would exceed ``spec.candidate_memory_mb`` (checked
            at the first batch; a job checks it before scoring).
        ValueError: A diverse strategy's batch without embeddings.
    """
    gather = _Candidates(spec) if spec.is_diverse else None
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
        embeddings = None
        if gather is not None:
            batch, embeddings = _split_embeddings(batch, spec.strategy)  # None: error rows only
        scores.write(batch)
        columns, values, failed = _values(spec, batch)
        errors.extend(
            (columns["key"][i], columns["shard"][i], str(columns["error"][i])) for i in np.flatnonzero(failed)
        )
        good += int((~failed).sum())
        summary.add(values[~failed], columns["key"][~failed].tolist())
        if gather is not None:
            if embeddings is not None:
                gather.add(columns, values, embeddings)
        elif ranks is not None:
            ranks.add(values)  # pass 1 of 2: the draw needs every value's global rank
        else:
            _offer(top, spec, columns, values)
    ended = time.perf_counter()
    if ranks is not None:
        for batch in scores.iter_batches():
            columns, values, _ = _values(spec, pa.Table.from_batches([batch]))
            _offer(top, spec, columns, values, ranks.ranks(values))
    selected = gather.select() if gather is not None else top.result()
    seconds = time.perf_counter() - ended
    return StreamedSelection(selected, summary, errors, good, rows["reused"], rows["scored"], seconds)


def select_candidates(spec: SelectionSpec, candidates: Candidates) -> list[tuple[str, float, dict[str, Any]]]:
    """What a diverse strategy picks from a gathered candidate set, as selection rows.

    The one place the query and the simulation both select from, so they agree on the same
    candidates.

    Args:
        spec: A diverse selection (``spec.is_diverse``).
        candidates: The gathered set, in canonical order.

    Returns:
        ``(key, -margin, selection row)`` in pick order, at most ``spec.k``.
    """
    picks = select_diverse(spec.strategy, candidates, spec.k, spec.seed, spec.clusters)
    picked = candidates.rows(picks)
    values = -np.asarray(candidates.margins)[picks]
    return list(zip(picked["key"].tolist(), values.tolist(), selection_rows(picked, values)))


class _Candidates:
    """The candidate gatherer of a diverse selection, sized from the first batch's embeddings."""

    def __init__(self, spec: SelectionSpec) -> None:
        self.spec = spec
        self.gatherer: CandidateGatherer | None = None

    def add(
        self, columns: Mapping[str, np.ndarray], values: np.ndarray, embeddings: tuple[np.ndarray, np.ndarray]
    ) -> None:
        residual, penultimate = embeddings
        if self.gatherer is None:
            classes, width = residual.shape[1], penultimate.shape[1]
            check_candidate_memory(self.spec.candidates, classes, width, self.spec.candidate_memory_mb)
            extras = [name for name in _CANDIDATE_EXTRAS if name in columns]
            self.gatherer = CandidateGatherer(self.spec.candidates, classes, width, extras=extras)
        # values = -margin, NaN on error rows: those never enter.
        self.gatherer.add(columns["key"].tolist(), -values, residual, penultimate, columns)

    def select(self) -> list[tuple[str, float, dict[str, Any]]]:
        if self.gatherer is None:
            return []
        return select_candidates(self.spec, self.gatherer.result())


def _split_embeddings(batch: pa.Table, strategy: str) -> tuple[pa.Table, tuple[np.ndarray, np.ndarray] | None]:
    """(the batch without its embedding columns, (residual [N, C], penultimate [N, D])); None for a
    batch without embeddings whose rows are all errors (a whole-shard error row)."""
    if missing := [name for name in _EMBEDDING_COLUMNS if name not in batch.column_names]:
        if batch.column("error").null_count == 0:
            return batch.drop_columns([n for n in _EMBEDDING_COLUMNS if n in batch.column_names]), None
        raise ValueError(
            f"{strategy} needs the scorer's embeddings, but a batch lacks {missing} "
            "(score with RowScorer(embeddings=True); rows copied from an earlier run have none)"
        )
    matrices = tuple(_matrix(batch.column(name)) for name in _EMBEDDING_COLUMNS)
    return batch.drop_columns(list(_EMBEDDING_COLUMNS)), matrices


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A column of equal-length float vectors as float32 [N, W]: a list or fixed-size-list column,
    or an extension type stored as one (Ray Data's tensor columns)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if not (
        pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)
    ):
        raise ValueError(f"an embedding column must hold vectors, got {array.type}")
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(array), -1) if len(array) else flat.reshape(0, 0)


def _tagged(reused: Iterable[pa.Table], scored: Iterable[pa.Table]) -> Iterator[tuple[str, pa.Table]]:
    yield from (("reused", batch) for batch in reused)
    yield from (("scored", batch) for batch in scored)


def _values(spec: SelectionSpec, batch: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(columns as numpy, acquisition values [N] with NaN on error rows, error mask [N])."""
    columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    failed = np.array([e is not None for e in columns["error"]], dtype=bool)
    # A diverse strategy ranks its candidates by margin: its values are margin's.
    values = acquisition_values("margin" if spec.is_diverse else spec.strategy, columns, seed=spec.seed)
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
