"""Where a query run's files live, and what every reader and writer of a run agrees on.

A run lives under ``{out}/{run_id}/`` on any fsspec storage (local path, ``s3://``, ...)::

    manifest.json       the commit point: created once, exclusively; names one attempt's files
    attempts/{attempt}/ one directory per attempt (a job, a rerun, a concurrent job):
        selection.parquet   the selected rows, rank 1 first
        errors.parquet      rows (or whole shards) that could not be scored, with the reason
        excluded.parquet    pool rows skipped because an exclusion named their key (key, shard)
        scores/part-*.parquet  every scored row (written by the job through ScoresWriter)

and ``{out}/LATEST`` holds the id of the newest committed run. A run without ``manifest.json``
is a failed or running job: readers refuse it. See docs/manifest.md for every field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

from pipeline.storage import display_uri, filesystem_for, join_path

__all__ = [
    "ATTEMPTS_DIR",
    "ERRORS_NAME",
    "EXCLUDED_NAME",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "RUN_ID_PATTERN",
    "SCHEMA_VERSION",
    "SCORES_DIR",
    "SELECTION_NAME",
    "ManifestError",
    "RunConflictError",
    "SchemaVersionError",
    "UncommittedRunError",
    "read_manifest_json",
    "resolve_run_path",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SELECTION_NAME = "selection.parquet"
ERRORS_NAME = "errors.parquet"
EXCLUDED_NAME = "excluded.parquet"
SCORES_DIR = "scores"
ATTEMPTS_DIR = "attempts"
LATEST_NAME = "LATEST"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(Exception):
    """Base class of manifest errors; each message names the run and the fix."""


class UncommittedRunError(ManifestError, FileNotFoundError):
    """The run directory has no manifest.json: the job failed or is still running."""


class RunConflictError(ManifestError, FileExistsError):
    """A run with this id was committed with different inputs."""


class SchemaVersionError(ManifestError, ValueError):
    """manifest.json has a schema version this code does not read."""


def read_manifest_json(fs: AbstractFileSystem, run_path: str) -> dict[str, Any]:
    """The JSON of manifest.json of the run at `run_path`, as written, refusing other schema versions
    (`lplgrad manifest verify` checks its fields; everything else reads a `Manifest`)."""
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


def resolve_run_path(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, run path) of the committed run `uri` names: a run directory, or an output
    root whose LATEST names one."""
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache()
    if fs.exists(join_path(path, MANIFEST_NAME)):
        return fs, path
    latest = join_path(path, LATEST_NAME)
    if fs.exists(latest):
        run_path = join_path(path, fs.cat_file(latest).decode().strip())
        if not fs.exists(join_path(run_path, MANIFEST_NAME)):
            raise UncommittedRunError(
                f"{display_uri(fs, latest)} names {display_uri(fs, run_path)}, which has no {MANIFEST_NAME}"
            )
        return fs, run_path
    if fs.exists(path):
        raise UncommittedRunError(
            f"{uri} has no {MANIFEST_NAME}: the query run failed or is still running, so its files are "
            "not a result; rerun the query job with the same run id to replace it"
        )
    raise FileNotFoundError(
        f"no query run at {uri}: expected {MANIFEST_NAME} (a run) or {LATEST_NAME} (an output root)"
    )
