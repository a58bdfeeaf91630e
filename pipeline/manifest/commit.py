"""The commit protocol of a query run (schema version 1; the layout is in _layout.py).

An attempt writes only under its own directory ``{out}/{run_id}/attempts/{attempt}/``;
:func:`commit_run` claims ``manifest.json`` and then publishes ``LATEST`` through the library's one
commit primitive (:func:`pipeline.claims.claim_then_publish`: an exclusive create, ``O_EXCL``
semantics locally, ``If-None-Match: *`` on S3), so exactly one attempt becomes the run and a
losing, crashed or concurrent attempt can never change it. The manifest records the sha256 of
every file it names, and how its own create was made (``claim``). A run without ``manifest.json``
is a failed or running job: readers refuse it. See docs/manifest.md for every field.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from fsspec import AbstractFileSystem

from pipeline.claims import claim_then_publish
from pipeline.manifest._inputs import QueryInputs
from pipeline.manifest._layout import (
    ATTEMPTS_DIR,
    ERRORS_NAME,
    EXCLUDED_NAME,
    LATEST_NAME,
    MANIFEST_NAME,
    RUN_ID_PATTERN,
    SCHEMA_VERSION,
    SCORES_DIR,
    SELECTION_NAME,
    ManifestError,
    RunConflictError,
)
from pipeline.manifest._record import Manifest, RunCounts, RunFiles, read_manifest_file
from pipeline.manifest._summary import ScoreSummary
from pipeline.manifest._tables import (
    SELECTION_SCHEMA,
    ScoresWriter,
    errors_table,
    excluded_table,
    selection_table,
    write_table,
)
from pipeline.storage import display_uri, filesystem_for, join_path, write_bytes_atomic

__all__ = [
    "COMMIT_STEPS",
    "RunState",
    "begin_run",
    "commit_run",
    "new_attempt_id",
    "new_run_id",
    "software_versions",
]

# The steps of commit_run, in order; LPLGRAD_FAULT_AT_COMMIT_STEP=<step> ends the process hard just
# before that step (the fault drill of tests/manifest/test_commit_protocol.py).
COMMIT_STEPS = ("tables", "scores-check", "manifest", "latest")
_FAULT_ENV = "LPLGRAD_FAULT_AT_COMMIT_STEP"


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
    committed: Manifest | None
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
        earlier = (
            f" ({self.earlier_attempts} uncommitted earlier attempt(s) there are ignored)"
            if self.earlier_attempts
            else ""
        )
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


def begin_run(out: str, run_id: str, fingerprint: str, storage_options: Mapping[str, Any] | None = None) -> RunState:
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
    if not RUN_ID_PATTERN.match(run_id) or run_id == LATEST_NAME:
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
        committed = read_manifest_file(fs, run_path)
        if committed.inputs_fingerprint != fingerprint:
            raise RunConflictError(_conflict_message(run_id, run_uri, committed, fingerprint))
        _advance_latest(fs, out_path, run_id)  # a job killed after its commit left LATEST behind
    else:
        attempts = join_path(run_path, ATTEMPTS_DIR)
        earlier = len(fs.ls(attempts, detail=False)) if fs.exists(attempts) else 0
    return RunState(run_id, run_uri, fingerprint, _utc_now(), committed, earlier, fs, out_path, new_attempt_id())


def _conflict_message(run_id: str, run_uri: str, committed: Manifest, fingerprint: str) -> str:
    return (
        f"run {run_id} at {run_uri} is committed with inputs fingerprint "
        f"{committed.inputs_fingerprint[:12]}..., but these inputs give {fingerprint[:12]}...; a committed "
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
) -> Manifest:
    """Write this attempt's tables, then claim manifest.json exclusively (the commit), then
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
        committed first, that one (its ``attempt`` then differs from ``state.attempt_id``). Its
        ``claim`` says whether the create was exclusive or the store's check-then-put fallback.

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
    written: dict[str, str] = {}
    for name, (file_name, rows) in tables.items():
        path = join_path(attempt, file_name)
        state.written[path] = write_table(fs, path, rows)
        written[name] = _relative(state, path)
    scores = sorted(p for p in state.written if p.startswith(join_path(attempt, SCORES_DIR) + "/"))
    files = RunFiles(
        written["selection"], written["errors"], tuple(_relative(state, p) for p in scores), written.get("excluded")
    )
    _fault_point("scores-check")
    _check_written(state)
    manifest = Manifest(
        run_id=state.run_id,
        attempt=state.attempt_id,
        started_at=state.started_at,
        finished_at=_utc_now(),
        inputs_fingerprint=state.fingerprint,
        inputs=inputs.to_dict(),
        checkpoint={"uri": inputs.checkpoint_uri, "sha256": inputs.checkpoint_sha256},
        counts=RunCounts(scored, excluded, error_rows.num_rows, table.num_rows),
        score_summary=summary.to_dict(),
        files=files,
        checksums={_relative(state, p): dict(record) for p, record in sorted(state.written.items())},
        software=software_versions(),
        extra=dict(extra or {}),
        shards=tuple(dict(entry) for entry in shards) if shards is not None else None,
        reuse=dict(reuse) if reuse is not None else None,
        schema_version=SCHEMA_VERSION,
    )
    _fault_point("manifest")
    try:
        claim = claim_then_publish(
            fs,
            join_path(state.run_path, MANIFEST_NAME),
            lambda kind: json.dumps(replace(manifest, claim=kind).to_dict(), indent=2, allow_nan=False).encode(),
            lambda _: _publish_latest(fs, state.out_path, state.run_id),
        )
    except FileExistsError:
        state.discard()
        fs.invalidate_cache()
        winner = read_manifest_file(fs, state.run_path)
        if winner.inputs_fingerprint != state.fingerprint:
            raise RunConflictError(
                f"another attempt committed run {state.run_id} at {state.run_uri} first, with other inputs "
                f"(fingerprint {winner.inputs_fingerprint[:12]}..., these give {state.fingerprint[:12]}...); this "
                "attempt's files were discarded and the committed run is unchanged (choose a new run id, e.g. "
                f"run_id={new_run_id()})"
            ) from None
        return winner
    return replace(manifest, claim=claim.kind)


def _relative(state: RunState, path: str) -> str:
    return path[len(state.run_path.rstrip("/")) + 1 :]


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


def _publish_latest(fs: AbstractFileSystem, out_path: str, run_id: str) -> None:
    _fault_point("latest")
    _advance_latest(fs, out_path, run_id)


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
