"""The parquet tables of a query run: selection, errors, and the streamed scores table.

Schemas are fixed here (see docs/manifest.md) so that a run reads back with plain pyarrow. The
scores table is written by :class:`ScoresWriter` in row-bounded part files, so neither the job
nor this library ever holds it whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.storage import display_uri, is_local, join_path

__all__ = [
    "ERRORS_SCHEMA",
    "EXCLUDED_SCHEMA",
    "SELECTION_SCHEMA",
    "ScoresWriter",
    "errors_table",
    "excluded_table",
    "file_checksum",
    "iter_parquet_batches",
    "selection_rows",
    "selection_table",
    "write_table",
]

# Per-sample statistics carried into the selection; "gradnorm" is RowScorer's "score" column,
# renamed because "score" in the selection is the acquisition value that ranked the row.
_STAT_FIELDS = [
    pa.field("gradnorm", pa.float64()),
    pa.field("entropy", pa.float64()),
    pa.field("margin", pa.float64()),
    pa.field("least_confidence", pa.float64()),
    pa.field("pred_class", pa.int64()),
    pa.field("pred_prob", pa.float64()),
    pa.field("predicted_loss", pa.float64()),
]
SELECTION_SCHEMA = pa.schema(
    [
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("selection_value", pa.float64()),
        *_STAT_FIELDS,
    ]
)
ERRORS_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("shard", pa.string()), pa.field("reason", pa.string(), nullable=False)]
)
# Pool rows skipped because an earlier selection or the labeled pool holds their key: kept so that
# a later incremental run knows which keys of a reused shard have no row in scores/.
EXCLUDED_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("shard", pa.string())])
# Selection column -> RowScorer column it comes from, where the names differ.
_SOURCE_COLUMN = {"gradnorm": "score"}


def selection_rows(batch: Mapping[str, Any], acquisition: np.ndarray) -> list[dict[str, Any]]:
    """Per-row dicts in the selection schema from a RowScorer output batch, for ``TopK.add(rows=)``.

    Args:
        batch: RowScorer output: ``key``, ``shard`` and the score columns, each [N].
        acquisition: Acquisition values [N] (become ``score``; RowScorer's ``score`` becomes
            ``gradnorm``).

    Returns:
        N dicts holding ``shard``, ``score`` and whichever statistics the batch has.
    """
    columns: dict[str, Any] = {"score": np.asarray(acquisition, dtype=np.float64)}
    if "shard" in batch:
        columns["shard"] = batch["shard"]
    for field in _STAT_FIELDS:
        source = _SOURCE_COLUMN.get(field.name, field.name)
        if source in batch:
            columns[field.name] = batch[source]
    lists = {
        name: (v.to_pylist() if isinstance(v, (pa.Array, pa.ChunkedArray)) else list(v)) for name, v in columns.items()
    }
    return [dict(zip(lists, values)) for values in zip(*lists.values())]


def selection_table(ranked: Sequence[tuple[str, float, Mapping[str, Any]]]) -> pa.Table:
    """The selection table from ``TopK.result()`` (best first): ranks 1..n assigned in order.

    Args:
        ranked: ``(key, selection_value, row)`` triples; ``row`` holds ``shard``, ``score`` (the
            acquisition value) and optionally the statistics (see :func:`selection_rows`).
            ``selection_value`` is what the top-k ranked: ``score`` itself, or its
            Gumbel-perturbed value under stochastic acquisition.

    Returns:
        A table with :data:`SELECTION_SCHEMA`; missing statistics are null.

    Raises:
        ValueError: If a key repeats.
    """
    keys = [key for key, _, _ in ranked]
    if len(set(keys)) != len(keys):
        raise ValueError("the selection repeats a key; every selected row must be a distinct sample")
    columns: dict[str, list[Any]] = {
        "rank": list(range(1, len(ranked) + 1)),
        "key": keys,
        "selection_value": [float(value) for _, value, _ in ranked],
    }
    for name in SELECTION_SCHEMA.names:
        if name not in columns:
            columns[name] = [_plain(row.get(name)) for _, _, row in ranked]
    return pa.table(columns, schema=SELECTION_SCHEMA)


def errors_table(errors: pa.Table | Iterable[tuple[str | None, str | None, str]]) -> pa.Table:
    """The errors table from ``(key, shard, reason)`` triples (key None for a whole-shard error).

    Raises:
        ValueError: If a reason is missing, or a table lacks a column.
    """
    if isinstance(errors, pa.Table):
        missing = set(ERRORS_SCHEMA.names) - set(errors.column_names)
        if missing:
            raise ValueError(f"errors table lacks columns {sorted(missing)}")
        return errors.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
    rows = list(errors)
    if any(reason is None for _, _, reason in rows):
        raise ValueError("every error row needs a reason")
    return pa.table(
        {name: [row[i] for row in rows] for i, name in enumerate(ERRORS_SCHEMA.names)}, schema=ERRORS_SCHEMA
    )


def excluded_table(rows: pa.Table | Iterable[tuple[str, str | None]]) -> pa.Table:
    """The excluded-rows table from ``(key, shard)`` pairs, sorted by shard then key.

    Raises:
        ValueError: If a key is missing, or a table lacks a column.
    """
    if isinstance(rows, pa.Table):
        missing = set(EXCLUDED_SCHEMA.names) - set(rows.column_names)
        if missing:
            raise ValueError(f"excluded table lacks columns {sorted(missing)}")
        table = rows.select(EXCLUDED_SCHEMA.names)
    else:
        pairs = list(rows)
        table = pa.table({"key": [k for k, _ in pairs], "shard": [s for _, s in pairs]})
    if table.column("key").null_count:
        raise ValueError("every excluded row needs a key")
    table = table.cast(EXCLUDED_SCHEMA)
    return table.sort_by([("shard", "ascending"), ("key", "ascending")]) if table.num_rows else table


def _plain(value: Any) -> Any:
    # numpy scalars -> Python, NaN stays NaN (pyarrow keeps it as a float, not null).
    return value.item() if isinstance(value, np.generic) else value


def write_table(fs: AbstractFileSystem, path: str, table: pa.Table) -> dict[str, Any]:
    """Write one parquet file (a single PUT on object stores).

    Returns:
        ``{"sha256": hex, "bytes": n}`` of the bytes written, for the manifest's ``checksums``.
    """
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    data = buffer.getvalue().to_pybytes()  # at most one part (rows_per_part rows) in memory
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def file_checksum(fs: AbstractFileSystem, path: str) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n}`` of a stored file, streamed in 4 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def iter_parquet_batches(
    fs: AbstractFileSystem, paths: Sequence[str], columns: Sequence[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from parquet files in order, one file open at a time."""
    for path in paths:
        with fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns)


class ScoresWriter:
    """Append score batches to ``scores/part-00000.parquet``, ``part-00001.parquet``, ...

    At most ``rows_per_part`` rows (plus one incoming batch) are buffered. The first batch fixes
    the schema; later batches are cast to it.

    Args:
        fs: Filesystem of the run directory.
        directory: Stripped path of the ``scores/`` directory.
        rows_per_part: Rows per part file (> 0).
    """

    def __init__(self, fs: AbstractFileSystem, directory: str, rows_per_part: int = 262_144) -> None:
        if rows_per_part <= 0:
            raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
        self.fs = fs
        self.directory = directory
        self.rows_per_part = rows_per_part
        self.schema: pa.Schema | None = None
        self.parts: list[str] = []
        self.checksums: dict[str, dict[str, Any]] = {}  # stripped part path -> write_table's record
        self.rows = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._closed = False

    def write(self, batch: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> None:
        """Append a batch (a table, record batch, or dict of equal-length columns).

        Raises:
            ValueError: If the writer is closed or the batch does not fit the first batch's schema.
        """
        if self._closed:
            raise ValueError("ScoresWriter is closed")
        table = (
            batch
            if isinstance(batch, pa.Table)
            else (pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else pa.table(dict(batch)))
        )
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            try:
                table = table.select(self.schema.names).cast(self.schema)
            except (KeyError, pa.ArrowInvalid, ValueError) as err:
                raise ValueError(
                    f"score batch schema {table.schema} does not match the first batch's {self.schema}: {err}"
                ) from err
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        while self._buffered >= self.rows_per_part:
            self._flush(self.rows_per_part)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._buffer)
        part, rest = table.slice(0, rows), table.slice(rows)
        path = join_path(self.directory, f"part-{len(self.parts):05d}.parquet")
        self.checksums[path] = write_table(self.fs, path, part)
        self.parts.append(path)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[str]:
        """Write the last part; returns every part's URI. Idempotent."""
        if not self._closed and self._buffered:
            self._flush(self._buffered)
        self._closed = True
        return [display_uri(self.fs, p) for p in self.parts]

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Read the written parts back in order (the second pass of ``softrank``); closes first."""
        self.close()
        return iter_parquet_batches(self.fs, self.parts, columns, batch_size)

    def __enter__(self) -> ScoresWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
