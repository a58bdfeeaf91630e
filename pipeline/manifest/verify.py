"""Check that a committed query run is complete and matches docs/manifest.md (schema version 1).

:func:`verify_run` reads a run (or an output root, following ``LATEST``) and lists every problem
it finds instead of stopping at the first: a manifest with missing fields or an inputs
fingerprint that does not recompute, a selection whose row count, ranks, keys or order do not
match, selected keys that are also errors, score part files that are missing, unlisted, or whose
rows do not add up to ``scored + errors``, and any file whose sha256 or size differs from the
``checksums`` the commit recorded (every file is read once for that; ``--quick`` compares sizes).
Parquet row counts come from file footers; only the ``key`` column of the scores table is
streamed (to find every selected key in it), and only when ``scan_scores`` is set.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.claims import CLAIM_KINDS
from pipeline.manifest._inputs import inputs_fingerprint
from pipeline.manifest._layout import ATTEMPTS_DIR, MANIFEST_NAME, SCORES_DIR, ManifestError, read_manifest_json
from pipeline.manifest._record import Manifest
from pipeline.manifest._tables import ERRORS_SCHEMA, SELECTION_SCHEMA, file_checksum
from pipeline.manifest.read import resolve_run
from pipeline.storage import filesystem_for, join_path

__all__ = ["Verification", "verify_run"]

# manifest.json fields a reader relies on: dotted path -> expected type(s).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "run_id": str,
    "started_at": str,
    "finished_at": str,
    "inputs_fingerprint": str,
    "inputs": dict,
    "inputs.pool.uri": str,
    "inputs.pool.shards": list,
    "inputs.checkpoint_sha256": str,
    "inputs.strategy.name": str,
    "inputs.k": int,
    "checkpoint.sha256": str,
    "counts.scored": int,
    "counts.excluded": int,
    "counts.errors": int,
    "counts.selected": int,
    "files.selection": str,
    "files.errors": str,
    "files.scores": list,
}


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify_run`.

    Attributes:
        uri: The run directory checked (``LATEST`` resolved), or the URI given when it did not resolve.
        problems: One sentence per problem; empty when the run is sound.
    """

    uri: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _get(manifest: Mapping[str, Any], dotted: str) -> Any:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_fields(manifest: Mapping[str, Any], run_path: str) -> list[str]:
    problems = []
    for dotted, kind in _REQUIRED.items():
        value = _get(manifest, dotted)
        if value is None or (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
            problems.append(f"{MANIFEST_NAME}: field {dotted} is missing or not a {getattr(kind, '__name__', kind)}")
    if problems:
        return problems
    if manifest["run_id"] != posixpath.basename(run_path.rstrip("/")):
        problems.append(f"{MANIFEST_NAME}: run_id {manifest['run_id']!r} is not the directory's name")
    if inputs_fingerprint(manifest["inputs"]) != manifest["inputs_fingerprint"]:
        problems.append(f"{MANIFEST_NAME}: inputs_fingerprint does not recompute from inputs (edited after commit?)")
    if manifest["checkpoint"]["sha256"] != manifest["inputs"]["checkpoint_sha256"]:
        problems.append(f"{MANIFEST_NAME}: checkpoint.sha256 differs from inputs.checkpoint_sha256")
    if manifest.get("claim", CLAIM_KINDS[0]) not in CLAIM_KINDS:
        problems.append(f"{MANIFEST_NAME}: claim {manifest['claim']!r} is not one of {', '.join(CLAIM_KINDS)}")
    counts = manifest["counts"]
    negative = [name for name, value in counts.items() if isinstance(value, int) and value < 0]
    if negative:
        problems.append(f"{MANIFEST_NAME}: negative counts {negative}")
    if counts["selected"] > manifest["inputs"]["k"]:
        problems.append(f"{MANIFEST_NAME}: counts.selected {counts['selected']} exceeds k {manifest['inputs']['k']}")
    if counts["selected"] > counts["scored"]:
        problems.append(
            f"{MANIFEST_NAME}: counts.selected {counts['selected']} exceeds counts.scored {counts['scored']}"
        )
    return problems


def _schema_problems(name: str, schema: pa.Schema, expected: pa.Schema) -> list[str]:
    # Extra columns are allowed (version 1 may grow nullable columns); missing or retyped ones are not.
    problems = []
    for want in expected:
        if want.name not in schema.names:
            problems.append(f"{name}: column {want.name} is missing")
        elif schema.field(want.name).type != want.type:
            problems.append(f"{name}: column {want.name} is {schema.field(want.name).type}, expected {want.type}")
    return problems


def _read_table(fs: AbstractFileSystem, path: str, name: str, problems: list[str]) -> pa.Table | None:
    if not fs.exists(path):
        problems.append(f"{name} is missing")
        return None
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).read()  # not read_table: see pipeline.manifest.load
    except (pa.ArrowException, OSError) as err:
        problems.append(f"{name} is not a readable parquet file: {err}")
        return None


def _check_selection(table: pa.Table, name: str, selected: int) -> list[str]:
    problems = _schema_problems(name, table.schema, SELECTION_SCHEMA)
    if table.num_rows != selected:
        problems.append(f"{name} has {table.num_rows} rows but counts.selected is {selected}")
    if problems:
        return problems
    ranks = table.column("rank").to_pylist()
    if ranks != list(range(1, len(ranks) + 1)):
        problems.append(f"{name}: ranks are not 1..{len(ranks)} in row order")
    keys = table.column("key").to_pylist()
    if None in keys:
        problems.append(f"{name}: a key is null")
    elif len(set(keys)) != len(keys):
        problems.append(f"{name}: keys repeat ({len(keys) - len(set(keys))} duplicates)")
    values = table.column("selection_value").to_pylist()
    if any(v is None or v != v for v in values):
        problems.append(f"{name}: a selection_value is null or NaN (such rows are never selected)")
    elif None not in keys:
        # Rank order: selection_value descending, ties by key ascending (docs/manifest.md).
        order = [(-v, k) for v, k in zip(values, keys)]
        if order != sorted(order):
            problems.append(f"{name}: rows are not ordered by selection_value (descending), ties by key")
    return problems


def _check_errors(table: pa.Table, name: str, errors: int, selected_keys: set[str]) -> list[str]:
    problems = _schema_problems(name, table.schema, ERRORS_SCHEMA)
    if table.num_rows != errors:
        problems.append(f"{name} has {table.num_rows} rows but counts.errors is {errors}")
    if "key" in table.column_names:
        both = sorted(selected_keys & {k for k in table.column("key").to_pylist() if k is not None})
        if both:
            problems.append(f"{len(both)} selected key(s) are also errors: {', '.join(both[:5])}")
    if "reason" in table.column_names and table.column("reason").null_count:
        problems.append(f"{name}: {table.column('reason').null_count} error row(s) without a reason")
    return problems


def _check_scores(
    fs: AbstractFileSystem, run_path: str, manifest: Manifest, selected_keys: set[str], scan: bool
) -> list[str]:
    problems: list[str] = []
    parts = list(manifest.files.scores)
    attempt = manifest.attempt
    directory = join_path(run_path, f"{ATTEMPTS_DIR}/{attempt}/{SCORES_DIR}" if attempt else SCORES_DIR)
    on_disk = {p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)} if fs.exists(directory) else set()
    unlisted = sorted(on_disk - {p.rsplit("/", 1)[-1] for p in parts})
    if unlisted:
        problems.append(f"{SCORES_DIR}/ holds files the manifest does not list: {', '.join(unlisted[:5])}")
    rows, schema, readable = 0, None, []
    for part in parts:
        path = join_path(run_path, part)
        if not fs.exists(path):
            problems.append(f"score part {part} is missing")
            continue
        try:
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle)
                part_schema, part_rows = meta.schema_arrow, meta.metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            problems.append(f"score part {part} is not a readable parquet file: {err}")
            continue
        if schema is None:
            schema = part_schema
        elif part_schema != schema:
            problems.append(f"score part {part} has a different schema from {parts[0]}")
        rows += part_rows
        readable.append(path)
    expected = manifest.counts.scored + manifest.counts.errors
    if len(readable) == len(parts) and rows != expected:
        problems.append(f"score parts hold {rows} rows but counts.scored + counts.errors is {expected}")
    if schema is not None and "key" not in schema.names:
        problems.append("score parts have no key column")
    elif scan and readable and len(readable) == len(parts):
        found: set[str] = set()
        for path in readable:
            with fs.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(columns=["key"], batch_size=65_536):
                    found.update(k for k in batch.column(0).to_pylist() if k in selected_keys)
        absent = sorted(selected_keys - found)
        if absent:
            problems.append(f"{len(absent)} selected key(s) are not in the scores table: {', '.join(absent[:5])}")
    return problems


def _check_checksums(fs: AbstractFileSystem, run_path: str, manifest: Manifest, full: bool) -> list[str]:
    """Every file the manifest names has a checksum, and its bytes still match it."""
    checksums = manifest.checksums
    if checksums is None:
        return []  # committed before checksums were recorded: nothing to compare against
    if not isinstance(checksums, Mapping):
        return [f"{MANIFEST_NAME}: field checksums is not an object"]
    problems = [f"{MANIFEST_NAME}: {name} has no checksum" for name in manifest.files.named() if name not in checksums]
    for name, record in sorted(checksums.items()):
        if posixpath.isabs(name) or ".." in name.split("/"):
            problems.append(f"{MANIFEST_NAME}: checksum path {name!r} leaves the run directory")
            continue
        path = join_path(run_path, name)
        try:
            actual = file_checksum(fs, path) if full else {"bytes": fs.info(path)["size"]}
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if actual["bytes"] != record.get("bytes"):
            problems.append(f"{name} has {actual['bytes']} bytes, the commit recorded {record.get('bytes')}")
        elif full and actual["sha256"] != record.get("sha256"):
            problems.append(f"{name}: sha256 differs from the one recorded at commit (changed after commit)")
    return problems


def verify_run(uri: str, storage_options: Mapping[str, Any] | None = None, *, scan_scores: bool = True) -> Verification:
    """Check a committed run against the schema-1 layout and its own counts.

    Args:
        uri: Run directory, or output root (follows ``LATEST``).
        storage_options: fsspec options.
        scan_scores: Also stream the scores table's ``key`` column to find every selected key in it,
            and hash every file against ``checksums`` (without it, sizes are compared).

    Returns:
        A :class:`Verification` listing every problem found (none: the run is sound).
    """
    try:
        run_uri = resolve_run(uri, storage_options)
        fs, run_path = filesystem_for(run_uri, storage_options)
        recorded = read_manifest_json(fs, run_path)
    except (ManifestError, FileNotFoundError) as err:
        return Verification(uri, (str(err),))
    problems = _check_fields(recorded, run_path)
    if any("is missing or not a" in p for p in problems):
        return Verification(run_uri, tuple(problems))
    manifest = Manifest.from_dict(recorded, run_uri)
    files, counts = manifest.files, manifest.counts
    selection = _read_table(fs, join_path(run_path, files.selection), files.selection, problems)
    selected_keys: set[str] = set()
    if selection is not None:
        problems += _check_selection(selection, files.selection, counts.selected)
        if "key" in selection.column_names:
            selected_keys = {k for k in selection.column("key").to_pylist() if k is not None}
    errors = _read_table(fs, join_path(run_path, files.errors), files.errors, problems)
    if errors is not None:
        problems += _check_errors(errors, files.errors, counts.errors, selected_keys)
    problems += _check_scores(fs, run_path, manifest, selected_keys, scan_scores)
    problems += [p for p in _check_checksums(fs, run_path, manifest, scan_scores) if not any(p in q for q in problems)]
    return Verification(run_uri, tuple(problems))
