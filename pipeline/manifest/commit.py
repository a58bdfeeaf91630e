"""The selection manifest of a query run: layout, commit protocol and readers (schema version 1).

A run lives under ``{out}/{run_id}/`` on any fsspec storage (local path, ``s3://``, ...)::

    manifest.json       the commit point: created once, exclusively; names one attempt's files
    attempts/{attempt}/ one directory per attempt (a job, a rerun, a concurrent job):
        selection.parquet   the selected rows, rank 1 first
        errors.parquet      rows (or whole shards) that could not be scored, with the reason
        excluded.parquet    pool rows skipped because an exclusion named their key (key, shard)
        scores/part-*.parquet  every scored row (written by the job through ScoresWriter)

and ``{out}/LATEST`` holds the id of the newest committed run. An attempt writes only under its
own directory; :func:`commit_run` creates ``manifest.json`` with an exclusive create (``O_EXCL``
semantics locally, ``If-None-Match: *`` on S3), so exactly one attempt becomes the run and a
losing, crashed or concurrent attempt can never change it. The manifest records the sha256 of
every file it names. A run without ``manifest.json`` is a failed or running job: readers refuse
it. See docs/manifest.md for every field.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.manifest._tables import (
    ERRORS_SCHEMA,
    EXCLUDED_SCHEMA,
    SELECTION_SCHEMA,
    ScoresWriter,
    errors_table,
    excluded_table,
    file_checksum,
    iter_parquet_batches,
    selection_rows,
    selection_table,
    write_table,
)
from pipeline.manifest._inputs import PoolShard, QueryInputs, inputs_fingerprint, keys_digest
from pipeline.manifest._summary import ScoreSummary
from pipeline.storage import create_exclusive, display_uri, filesystem_for, join_path, write_bytes_atomic

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ATTEMPTS_DIR",
    "COMMIT_STEPS",
    "ERRORS_NAME",
    "ERRORS_SCHEMA",
    "EXCLUDED_NAME",
    "EXCLUDED_SCHEMA",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SCORES_DIR",
    "SELECTION_NAME",
    "SELECTION_SCHEMA",
    "ManifestError",
    "PoolShard",
    "QueryInputs",
    "RunConflictError",
    "RunState",
    "SchemaVersionError",
    "ScoreSummary",
    "ScoresWriter",
    "UncommittedRunError",
    "begin_run",
    "commit_run",
    "errors_table",
    "excluded_table",
    "inputs_fingerprint",
    "iter_scores",
    "keys_digest",
    "load",
    "load_errors",
    "load_excluded",
    "new_attempt_id",
    "new_run_id",
    "previously_selected_keys",
    "previous_run",
    "read_manifest",
    "resolve_run",
    "selection_rows",
    "selection_table",
    "software_versions",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SELECTION_NAME = "selection.parquet"
ERRORS_NAME = "errors.parquet"
EXCLUDED_NAME = "excluded.parquet"
SCORES_DIR = "scores"
ATTEMPTS_DIR = "attempts"
LATEST_NAME = "LATEST"
# The steps of commit_run, in order; LPLGRAD_FAULT_AT_COMMIT_STEP=<step> ends the process hard just
# before that step (the fault drill of tests/test_commit_protocol.py).
COMMIT_STEPS = ("tables", "scores-check", "manifest", "latest")
_FAULT_ENV = "LPLGRAD_FAULT_AT_COMMIT_STEP"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(Exception):
    """Base class of manifest errors; each message names the run and the fix."""


class UncommittedRunError(ManifestError, FileNotFoundError):
    """The run directory has no manifest.json: the job failed or is still running."""


class RunConflictError(ManifestError, FileExistsError):
    """A run with this id was committed with different inputs."""


class SchemaVersionError(ManifestError, ValueError):
    """manifest.json has a schema version this code does not read."""


def new_run_id(prefix: str = "query") -> str:
    """``{prefix}-YYYYmmddTHHMMSSZ`` in UTC: ids that sort in time order, as LATEST assumes."""
    return f"{prefix}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class RunState:
    """What :func:`begin_run` found and decided.

    Attributes:
        run_id: The run id.
        run_uri: ``{out}/{run_id}`` as a user would type it.
        fingerprint: The inputs fingerprint the run is for.
        started_at: UTC ISO time of :func:`begin_run`.
        committed: The existing manifest when the run was already committed with these inputs
            (then there is nothing to do), else ``None``.
        earlier_attempts: Uncommitted attempt directories found under the run (crashed, or still
            running elsewhere); they are never read and never part of the run.
        fs: Filesystem of ``out``.
        out_path: Stripped path of ``out``.
        attempt_id: This attempt's directory name under ``attempts/``.
        written: Stripped path -> ``{"sha256", "bytes"}`` of every file this attempt wrote.
    """

    run_id: str
    run_uri: str
    fingerprint: str
    started_at: str
    committed: dict[str, Any] | None
    earlier_attempts: int
    fs: AbstractFileSystem
    out_path: str
    attempt_id: str = ""
    written: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def already_committed(self) -> bool:
        """True when the job has nothing to do (same run id, same inputs, committed)."""
        return self.committed is not None

    @property
    def run_path(self) -> str:
        """Stripped path of the run directory."""
        return join_path(self.out_path, self.run_id)

    @property
    def attempt_path(self) -> str:
        """Stripped path of this attempt's directory: everything the job writes goes here."""
        return join_path(join_path(self.run_path, ATTEMPTS_DIR), self.attempt_id)

    @property
    def message(self) -> str:
        """One line for the job to print."""
        if self.already_committed:
            return f"run {self.run_id} is already committed at {self.run_uri} with the same inputs: nothing to do"
        earlier = (f" ({self.earlier_attempts} uncommitted earlier attempt(s) there are ignored)"
                   if self.earlier_attempts else "")
        return f"starting run {self.run_id} at {self.run_uri}, attempt {self.attempt_id}{earlier}"

    def scores_writer(self, rows_per_part: int = 262_144) -> ScoresWriter:
        """A writer of this attempt's ``scores/`` part files (their checksums go to ``written``)."""
        writer = ScoresWriter(self.fs, join_path(self.attempt_path, SCORES_DIR), rows_per_part)
        writer.checksums = self.written  # shared: commit_run records every part the writer wrote
        return writer

    def discard(self) -> None:
        """Delete this attempt's directory (a losing attempt cleans up after itself)."""
        try:
            if self.fs.exists(self.attempt_path):
                self.fs.rm(self.attempt_path, recursive=True)
        except OSError:
            pass  # inert: an unreferenced attempt is never read


def new_attempt_id() -> str:
    """``YYYYmmddTHHMMSSZ-<12 hex>``: unique per attempt, sorting in start order."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def begin_run(
    out: str, run_id: str, fingerprint: str, storage_options: Mapping[str, Any] | None = None
) -> RunState:
    """Decide what a query job does with ``{out}/{run_id}``: no-op, refuse, or start an attempt.

    Nothing is deleted: an attempt writes only under ``attempts/{attempt_id}/``, so earlier
    attempts (crashed, or running elsewhere right now) are left alone and cannot be harmed.

    Args:
        out: Output root (local path or fsspec URI).
        run_id: Letters, digits, ``.``, ``_``, ``-`` (not starting with a symbol), at most 128.
        fingerprint: ``QueryInputs.fingerprint()`` of this job.
        storage_options: fsspec options (S3 endpoint, credentials).

    Returns:
        A :class:`RunState`; when ``already_committed``, the job prints ``message`` and exits 0.

    Raises:
        ValueError: On a malformed run id.
        RunConflictError: If the run was committed with a different fingerprint.
        SchemaVersionError: If the committed manifest has an unknown schema version.
    """
    if not _RUN_ID.match(run_id) or run_id == LATEST_NAME:
        raise ValueError(
            f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', start with a letter "
            f"or digit, and not be {LATEST_NAME!r} (e.g. {new_run_id()})"
        )
    fs, out_path = filesystem_for(out, storage_options)
    fs.invalidate_cache()  # listings may be cached from before another process wrote
    run_path = join_path(out_path, run_id)
    run_uri = display_uri(fs, run_path)
    committed, earlier = None, 0
    if fs.exists(join_path(run_path, MANIFEST_NAME)):
        committed = _read_manifest_file(fs, run_path)
        if committed.get("inputs_fingerprint") != fingerprint:
            raise RunConflictError(_conflict_message(run_id, run_uri, committed, fingerprint))
        _advance_latest(fs, out_path, run_id)  # a job killed after its commit left LATEST behind
    else:
        attempts = join_path(run_path, ATTEMPTS_DIR)
        earlier = len(fs.ls(attempts, detail=False)) if fs.exists(attempts) else 0
    return RunState(run_id, run_uri, fingerprint, _utc_now(), committed, earlier, fs, out_path, new_attempt_id())


def _conflict_message(run_id: str, run_uri: str, committed: Mapping[str, Any], fingerprint: str) -> str:
    return (
        f"run {run_id} at {run_uri} is committed with inputs fingerprint "
        f"{str(committed.get('inputs_fingerprint'))[:12]}..., but these inputs give {fingerprint[:12]}...; a committed "
        f"run is never overwritten: choose a new run id (e.g. run_id={new_run_id()})"
    )


def software_versions() -> dict[str, str | None]:
    """Versions of python and the packages a result depends on (``None`` when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("lplgrad", "torch", "ray", "pyarrow", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def commit_run(
    state: RunState,
    inputs: QueryInputs,
    selection: pa.Table | Sequence[tuple[str, float, Mapping[str, Any]]],
    errors: pa.Table | Iterable[tuple[str | None, str | None, str]],
    *,
    scored: int,
    excluded: int,
    summary: ScoreSummary,
    extra: Mapping[str, Any] | None = None,
    excluded_rows: pa.Table | Iterable[tuple[str, str | None]] | None = None,
    shards: Sequence[Mapping[str, Any]] | None = None,
    reuse: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write this attempt's tables, then create manifest.json exclusively (the commit), then
    advance LATEST.

    Every file goes under the attempt's own directory; ``manifest.json`` names them with their
    sha256 and is created only if no attempt committed first. The attempt that loses the create
    deletes its own directory and leaves the committed run byte for byte as it was.

    Args:
        state: From :func:`begin_run` (not already committed).
        inputs: The inputs whose fingerprint ``state`` was begun with.
        selection: A :func:`selection_table`, or ``TopK.result()`` triples to build one from.
        errors: An :data:`ERRORS_SCHEMA` table or ``(key, shard, reason)`` triples.
        scored: Rows that got an acquisition value (selection candidates).
        excluded: Rows skipped because an earlier run selected them.
        summary: Statistics of the acquisition values of the scored rows.
        extra: JSON-serialisable job details (resolved config, cluster) stored under ``extra``.
        excluded_rows: The ``excluded`` rows as ``(key, shard)`` pairs or an
            :data:`EXCLUDED_SCHEMA` table, written to excluded.parquet; ``None`` writes no file
            (a later incremental run then reuses nothing from this one).
        shards: Per-shard records (``uri``, ``identity``, ``reused_from``, row counts; see
            docs/manifest.md), stored under ``shards``.
        reuse: Where an incremental run took rows from and why (``source``, ``reason``).

    Returns:
        The committed manifest: this attempt's, or, when a concurrent attempt with the same inputs
        committed first, that one (its ``attempt`` then differs from ``state.attempt_id``).

    Raises:
        ManifestError: If the state is a no-op, the fingerprint differs from ``state``'s, the
            selection is larger than ``k``, ``excluded_rows`` does not hold ``excluded`` rows, or
            a file this attempt wrote is gone or changed size before the commit.
        RunConflictError: If another attempt committed this run id with other inputs first.
    """
    if state.already_committed:
        raise ManifestError(f"run {state.run_id} is already committed; the job should have stopped at begin_run")
    if inputs.fingerprint() != state.fingerprint:
        raise ManifestError(f"run {state.run_id} was begun for fingerprint {state.fingerprint}, not these inputs'")
    table = selection if isinstance(selection, pa.Table) else selection_table(selection)
    table = table.select(SELECTION_SCHEMA.names).cast(SELECTION_SCHEMA)
    if table.num_rows > inputs.k:
        raise ManifestError(f"selection has {table.num_rows} rows, more than k={inputs.k}")
    error_rows = errors_table(errors)
    excluded_keys = excluded_table(excluded_rows) if excluded_rows is not None else None
    if excluded_keys is not None and excluded_keys.num_rows != excluded:
        raise ManifestError(f"excluded_rows holds {excluded_keys.num_rows} rows but excluded={excluded}")
    fs, attempt = state.fs, state.attempt_path
    _fault_point("tables")
    tables = {"selection": (SELECTION_NAME, table), "errors": (ERRORS_NAME, error_rows)}
    if excluded_keys is not None:
        tables["excluded"] = (EXCLUDED_NAME, excluded_keys)
    files: dict[str, Any] = {}
    for name, (file_name, rows) in tables.items():
        path = join_path(attempt, file_name)
        state.written[path] = write_table(fs, path, rows)
        files[name] = _relative(state, path)
    scores = sorted(p for p in state.written if p.startswith(join_path(attempt, SCORES_DIR) + "/"))
    files["scores"] = [_relative(state, p) for p in scores]
    _fault_point("scores-check")
    _check_written(state)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "run_id": state.run_id,
        "attempt": state.attempt_id,
        "started_at": state.started_at,
        "finished_at": _utc_now(),
        "inputs_fingerprint": state.fingerprint,
        "inputs": inputs.to_dict(),
        "checkpoint": {"uri": inputs.checkpoint_uri, "sha256": inputs.checkpoint_sha256},
        "counts": {"scored": scored, "excluded": excluded, "errors": error_rows.num_rows, "selected": table.num_rows},
        "score_summary": summary.to_dict(),
        "files": files,
        "checksums": {_relative(state, p): dict(record) for p, record in sorted(state.written.items())},
        "software": software_versions(),
        "extra": dict(extra or {}),
    }
    if shards is not None:
        manifest["shards"] = [dict(entry) for entry in shards]
    if reuse is not None:
        manifest["reuse"] = dict(reuse)
    data = json.dumps(manifest, indent=2, allow_nan=False).encode()
    _fault_point("manifest")
    try:
        create_exclusive(fs, join_path(state.run_path, MANIFEST_NAME), data)  # the commit point
    except FileExistsError:
        state.discard()
        fs.invalidate_cache()
        winner = _read_manifest_file(fs, state.run_path)
        if winner.get("inputs_fingerprint") != state.fingerprint:
            raise RunConflictError(
                f"another attempt committed run {state.run_id} at {state.run_uri} first, with other inputs (fingerprint "
                f"{str(winner.get('inputs_fingerprint'))[:12]}..., these give {state.fingerprint[:12]}...); this attempt's "
                f"files were discarded and the committed run is unchanged (choose a new run id, e.g. run_id={new_run_id()})"
            ) from None
        return winner
    _fault_point("latest")
    _advance_latest(fs, state.out_path, state.run_id)
    return manifest


def _relative(state: RunState, path: str) -> str:
    return path[len(state.run_path.rstrip("/")) + 1:]


def _check_written(state: RunState) -> None:
    """Every file this attempt wrote is still there with its size: one listing, no reads."""
    fs = state.fs
    fs.invalidate_cache()
    found = fs.find(state.attempt_path, detail=True) if fs.exists(state.attempt_path) else {}
    sizes = {path.rstrip("/"): info.get("size") for path, info in found.items()}
    for path, record in state.written.items():
        if sizes.get(path) != record["bytes"]:
            raise ManifestError(
                f"{display_uri(fs, path)} is gone or changed size before the commit (something deleted or rewrote "
                f"attempt {state.attempt_id}); nothing was committed: run the job again"
            )


def _fault_point(step: str) -> None:
    # The commit fault drill: a process told to die at this step ends like a killed job would.
    if os.environ.get(_FAULT_ENV) == step:
        os._exit(137)


def _advance_latest(fs: AbstractFileSystem, out_path: str, run_id: str) -> None:
    # LATEST only moves forward in run-id order, so committing an old-sorting id (a backfill, a
    # rerun) never hides a newer run. Read-then-write, re-read once: two jobs committing different
    # ids in the same instant can still leave the older id (docs/manifest.md); LATEST is a pointer
    # for people, each run directory stays the record.
    latest = join_path(out_path, LATEST_NAME)
    for _ in range(2):
        fs.invalidate_cache()
        current = fs.cat_file(latest).decode().strip() if fs.exists(latest) else None
        if current is not None and run_id <= current:
            return
        write_bytes_atomic(fs, latest, run_id.encode())


def _read_manifest_file(fs: AbstractFileSystem, run_path: str) -> dict[str, Any]:
    where = display_uri(fs, join_path(run_path, MANIFEST_NAME))
    try:
        manifest = json.loads(fs.cat_file(join_path(run_path, MANIFEST_NAME)))
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} is not valid JSON: {err}") from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        fix = "upgrade lplgrad to read it" if newer else "it was not written by this tool"
        raise SchemaVersionError(f"{where} has schema_version {version!r}; this code reads {SCHEMA_VERSION}: {fix}")
    return manifest


def _resolve(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache()
    if fs.exists(join_path(path, MANIFEST_NAME)):
        return fs, path
    latest = join_path(path, LATEST_NAME)
    if fs.exists(latest):
        run_path = join_path(path, fs.cat_file(latest).decode().strip())
        if not fs.exists(join_path(run_path, MANIFEST_NAME)):
            raise UncommittedRunError(f"{display_uri(fs, latest)} names {display_uri(fs, run_path)}, which has no {MANIFEST_NAME}")
        return fs, run_path
    if fs.exists(path):
        raise UncommittedRunError(
            f"{uri} has no {MANIFEST_NAME}: the query run failed or is still running, so its files are "
            "not a result; rerun the query job with the same run id to replace it"
        )
    raise FileNotFoundError(f"no query run at {uri}: expected {MANIFEST_NAME} (a run) or {LATEST_NAME} (an output root)")


def resolve_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The committed run directory that ``uri`` (a run, or an output root with LATEST) names.

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        FileNotFoundError: If nothing is there.
    """
    fs, run_path = _resolve(uri, storage_options)
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
        name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        if _RUN_ID.match(name) and name < before and fs.exists(join_path(join_path(path, name), MANIFEST_NAME))
    )
    return display_uri(fs, join_path(path, runs[-1])) if runs else None


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json of a committed run (``uri`` = run directory, or output root: follows LATEST).

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        SchemaVersionError: If its schema version is not :data:`SCHEMA_VERSION`.
        FileNotFoundError: If nothing is there.
    """
    fs, run_path = _resolve(uri, storage_options)
    return _read_manifest_file(fs, run_path)


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
    fs, run_path = _resolve(uri, storage_options)
    manifest = _read_manifest_file(fs, run_path)
    with fs.open(join_path(run_path, manifest["files"]["selection"]), "rb") as handle:
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
    fs, run_path = _resolve(uri, storage_options)
    parts = [join_path(run_path, name) for name in _read_manifest_file(fs, run_path)["files"]["scores"]]
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
    fs, run_path = _resolve(uri, storage_options)
    relative = _read_manifest_file(fs, run_path)["files"].get(name)
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
