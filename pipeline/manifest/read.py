"""Readers of committed query runs: resolve a run (or an output root's LATEST), read its manifest,
selection, scores, errors and exclusions. Every reader refuses a run without manifest.json."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from pipeline.manifest._layout import (
    MANIFEST_NAME,
    RUN_ID_PATTERN,
    ManifestError,
    resolve_run_path,
)
from pipeline.manifest._record import Manifest, read_manifest_file
from pipeline.manifest._tables import iter_parquet_batches
from pipeline.storage import display_uri, filesystem_for, join_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "iter_scores",
    "load",
    "load_errors",
    "load_excluded",
    "previous_run",
    "previously_selected_keys",
    "read_manifest",
    "resolve_run",
]


def resolve_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The committed run directory that ``uri`` (a run, or an output root with LATEST) names.

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        FileNotFoundError: If nothing is there.
    """
    fs, run_path = resolve_run_path(uri, storage_options)
    return display_uri(fs, run_path)


def previous_run(out: str, before: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest committed run under the output root `out` whose id sorts before `before`.

    A nightly job excludes what earlier nights selected by naming its own output root. Following
    LATEST would, on a re-run of a committed night, name that night itself; this names the night
    before (None on the first night).
    """
    fs, path = filesystem_for(out, storage_options)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return None
    runs = sorted(
        name
        for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        if RUN_ID_PATTERN.match(name) and name < before and fs.exists(join_path(join_path(path, name), MANIFEST_NAME))
    )
    return display_uri(fs, join_path(path, runs[-1])) if runs else None


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest of a committed run (``uri`` = run directory, or output root: follows LATEST).

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        SchemaVersionError: If its schema version is not :data:`SCHEMA_VERSION`.
        ManifestError: If a field a reader relies on is missing or mistyped.
        FileNotFoundError: If nothing is there.
    """
    fs, run_path = resolve_run_path(uri, storage_options)
    return read_manifest_file(fs, run_path)


def load(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    as_pandas: bool = False,
) -> pa.Table | pd.DataFrame:
    """The selection of a committed run, rank 1 first.

    Args:
        uri: Run directory ``{out}/{run_id}``, or ``{out}`` to follow LATEST.
        storage_options: fsspec options.
        columns: Subset of :data:`SELECTION_SCHEMA` columns (all by default).
        as_pandas: Return a pandas DataFrame instead of a pyarrow Table.

    Returns:
        The selection table (or DataFrame).

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        SchemaVersionError: If its schema version is not :data:`SCHEMA_VERSION`.
        FileNotFoundError: If nothing is there.
    """
    fs, run_path = resolve_run_path(uri, storage_options)
    manifest = read_manifest_file(fs, run_path)
    with fs.open(join_path(run_path, manifest.files.selection), "rb") as handle:
        # ParquetFile.read, not pq.read_table: on a Python file object read_table leaves pool threads
        # releasing Python objects after it returns, which can abort a short-lived process at exit
        # ("terminate called without an active exception"; pyarrow 26, Python 3.11).
        table = pq.ParquetFile(handle).read(columns=list(columns) if columns is not None else None)
    return table.to_pandas() if as_pandas else table


def iter_scores(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 65_536,
    shards: Iterable[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream the full scores table of a committed run, one part file at a time.

    Args:
        uri: Run directory, or output root (follows LATEST).
        storage_options: fsspec options.
        columns: Columns to read (all by default).
        batch_size: Rows per record batch read (batches are smaller after a ``shards`` filter).
        shards: Only rows whose ``shard`` is one of these URIs (empty batches are skipped).

    Raises:
        UncommittedRunError, SchemaVersionError, FileNotFoundError: As :func:`load`.
    """
    fs, run_path = resolve_run_path(uri, storage_options)
    parts = [join_path(run_path, name) for name in read_manifest_file(fs, run_path).files.scores]
    batches = iter_parquet_batches(fs, parts, columns, batch_size)
    if shards is None:
        return batches
    wanted = pa.array(sorted(set(shards)), pa.string())
    return _rows_of_shards(batches, wanted)


def _rows_of_shards(batches: Iterator[pa.RecordBatch], wanted: pa.Array) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        kept = batch.filter(pa.compute.is_in(batch.column("shard"), value_set=wanted))
        if kept.num_rows:
            yield kept


def _run_table(uri: str, name: str, storage_options: Mapping[str, Any] | None) -> pa.Table | None:
    fs, run_path = resolve_run_path(uri, storage_options)
    relative = getattr(read_manifest_file(fs, run_path).files, name)
    if relative is None:
        return None
    with fs.open(join_path(run_path, relative), "rb") as handle:
        return pq.ParquetFile(handle).read()  # not read_table: see load()


def load_errors(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """errors.parquet of a committed run (:data:`ERRORS_SCHEMA`).

    Raises:
        UncommittedRunError, SchemaVersionError, FileNotFoundError: As :func:`load`.
    """
    table = _run_table(uri, "errors", storage_options)
    if table is None:
        raise ManifestError(f"{uri}: manifest.json lists no errors file; check it with `lplgrad manifest verify`")
    return table


def load_excluded(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table | None:
    """excluded.parquet of a committed run (:data:`EXCLUDED_SCHEMA`), ``None`` if it has none
    (runs committed before incremental runs existed).

    Raises:
        UncommittedRunError, SchemaVersionError, FileNotFoundError: As :func:`load`.
    """
    return _run_table(uri, "excluded", storage_options)


def previously_selected_keys(
    manifest_uris: Iterable[str], storage_options: Mapping[str, Any] | None = None
) -> set[str]:
    """Keys selected by earlier committed runs, to exclude from a new query.

    Args:
        manifest_uris: Run directories, or output roots (each follows its LATEST).
        storage_options: fsspec options shared by all of them.

    Returns:
        The union of their selection keys.

    Raises:
        UncommittedRunError: If one of them is not committed (its selection is not a result).
    """
    keys: set[str] = set()
    for uri in manifest_uris:
        keys.update(load(uri, storage_options, columns=["key"]).column("key").to_pylist())
    return keys
