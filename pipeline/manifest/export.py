"""Take a committed query run to the people who label it: summarise, export, extract images.

Three operations on a run directory (or an output root, following ``LATEST``) on any fsspec
storage, all read through :mod:`pipeline.manifest`:

- :func:`run_summary` / :func:`format_summary`: what ran, on what, and the top of the selection;
- :func:`export_selection`: the selection as CSV, JSON Lines, or a Label Studio task-import file
  whose image URLs are ``{prefix}/{key}.{ext}``;
- :func:`extract_images`: copy the selected images out of the pool's shards as ``{key}.{ext}``
  files (a local folder or any fsspec prefix), reading each shard at most once. Payload bytes
  are copied as stored: nothing is decoded, and nothing is unpickled.

No Ray here; ``ray_jobs/manifest_cli.py`` is the command line (``lplgrad manifest ...``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import posixpath
import urllib.parse
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from fsspec import AbstractFileSystem

from pipeline.manifest._record import Manifest
from pipeline.manifest.read import load, read_manifest, resolve_run
from pipeline.pools import (
    IMAGE_EXTENSIONS,
    PoolError,
    RawSample,
    ResolvedPool,
    ShardRef,
    iter_shard_samples,
    resolve_pool,
    validate_key,
)
from pipeline.storage import display_uri, filesystem_for, join_path, write_bytes_atomic

__all__ = [
    "EXPORT_FORMATS",
    "CommittedRun",
    "ExtractReport",
    "export_selection",
    "extract_images",
    "format_summary",
    "image_extensions",
    "open_run",
    "run_summary",
]

EXPORT_FORMATS = ("csv", "jsonl", "label-studio")


@dataclass(frozen=True)
class CommittedRun:
    """A committed run, resolved once (so ``LATEST`` moving meanwhile changes nothing).

    Attributes:
        uri: The run directory as a user would type it.
        manifest: Its manifest.
        storage_options: fsspec options used to reach it (and its pool).
    """

    uri: str
    manifest: Manifest
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The run id recorded in the manifest."""
        return self.manifest.run_id

    def selection(self) -> pa.Table:
        """selection.parquet, rank 1 first."""
        return load(self.uri, self.storage_options)


def open_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> CommittedRun:
    """Resolve ``uri`` (a run directory, or an output root: follows ``LATEST``) and read its manifest.

    Raises:
        UncommittedRunError: If the run has no manifest.json.
        SchemaVersionError: If its schema version is not the one this code reads.
        FileNotFoundError: If nothing is there.
    """
    options = dict(storage_options or {})
    run_uri = resolve_run(uri, options)
    return CommittedRun(run_uri, read_manifest(run_uri, options), options)


# -- show -------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    # NaN/inf are not JSON; a statistic that does not exist is null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _seconds_between(start: str | None, end: str | None) -> float | None:
    def parse(text: str | None) -> _dt.datetime:
        return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))  # Python 3.10 reads no "Z"

    try:
        return (parse(end) - parse(start)).total_seconds()
    except ValueError:
        return None


def run_summary(run: CommittedRun, top: int = 10) -> dict[str, Any]:
    """A JSON-ready summary of a run: identity, times, inputs, counts and the first ``top`` rows.

    Args:
        run: From :func:`open_run`.
        top: Selection rows to include (rank order).

    Returns:
        A dict of plain values (NaN statistics as ``None``).
    """
    manifest = run.manifest
    inputs = manifest.inputs
    pool = inputs.get("pool", {})
    shards = pool.get("shards", [])
    sizes = [s.get("samples") for s in shards]
    rows = run.selection().slice(0, max(top, 0)).to_pylist()
    return {
        "run_id": manifest.run_id,
        "run_uri": run.uri,
        "started_at": manifest.started_at,
        "finished_at": manifest.finished_at,
        "seconds": _seconds_between(manifest.started_at, manifest.finished_at),
        "strategy": inputs.get("strategy", {}).get("name"),
        "strategy_params": inputs.get("strategy", {}).get("params", {}),
        "k": inputs.get("k"),
        "pool": {
            "uri": pool.get("uri"),
            "shards": len(shards),
            "samples": sum(sizes) if shards and None not in sizes else None,
        },
        "subset": inputs.get("subset"),
        "exclusions": inputs.get("exclusions"),
        "features": inputs.get("features"),
        "checkpoint": dict(manifest.checkpoint),
        "inputs_fingerprint": manifest.inputs_fingerprint,
        "counts": manifest.counts.to_dict(),
        "score_summary": {k: _plain(v) for k, v in manifest.score_summary.items()},
        "software": dict(manifest.software),
        "claim": manifest.claim,
        "top": [{k: _plain(v) for k, v in row.items()} for row in rows],
    }


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


_TOP_COLUMNS = ("rank", "key", "score", "selection_value", "pred_class", "pred_prob", "shard")


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render :func:`run_summary` as aligned text for a terminal."""
    counts = summary.get("counts") or {}
    checkpoint = summary.get("checkpoint") or {}
    exclusions = summary.get("exclusions") or {}
    stats = summary.get("score_summary") or {}
    quantiles = stats.get("quantiles") or {}
    seconds = summary.get("seconds")
    took = "" if seconds is None else f" ({seconds:.0f} s)" if seconds < 120 else f" ({seconds / 60:.1f} min)"
    pool = summary["pool"]
    lines = [
        f"run         {summary['run_id']}  {summary['run_uri']}",
        f"time        {summary['started_at']} -> {summary['finished_at']}{took}",
        f"commit      manifest.json created {summary.get('claim') or '(how: not recorded)'}",
        f"strategy    {summary['strategy']} {json.dumps(summary['strategy_params'], sort_keys=True)}  k={summary['k']}",
        f"pool        {pool['uri']}  ({pool['shards']} shards, {_number(pool['samples'])} samples)",
        f"checkpoint  {checkpoint.get('uri')}  sha256 {checkpoint.get('sha256')}",
        *(
            [
                f"proxy       features {summary['features'].get('store')}  "
                f"backbone sha256 {summary['features'].get('backbone_sha256')}"
            ]
            if summary.get("features")
            else []
        ),
        f"exclusions  {exclusions.get('num_keys', 0)} keys from {len(exclusions.get('runs') or [])} run(s)"
        + "".join(f"\n              {r}" for r in exclusions.get("runs") or []),
        "counts      "
        + "  ".join(f"{name} {counts.get(name)}" for name in ("scored", "excluded", "errors", "selected")),
        "scores      "
        + "  ".join(f"{name} {_number(stats.get(name))}" for name in ("min", "mean", "std", "max"))
        + (f"  median {_number(quantiles.get('0.5'))}" if quantiles else ""),
        "software    " + "  ".join(f"{k} {v}" for k, v in (summary.get("software") or {}).items()),
    ]
    rows = summary.get("top") or []
    if rows:
        columns = [c for c in _TOP_COLUMNS if c in rows[0]]
        # Shard names, not URIs: the pool's prefix is on the pool line already.
        cells = [
            [_basename(str(row[c])) if c == "shard" and row.get(c) else _number(row.get(c)) for c in columns]
            for row in rows
        ]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines.append(f"top {len(rows)}:")
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        lines.extend("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)
    return "\n".join(lines)


# -- finding the selected samples in the pool ----------------------------------------------------


def _basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


@dataclass
class _Search:
    """Progress of a search for selected samples: keys not found (with why), shards opened."""

    missing: dict[str, str] = field(default_factory=dict)
    shards_read: int = 0


def _scan(
    pool: ResolvedPool, shard: ShardRef, keys: set[str], read_data: bool, search: _Search
) -> Generator[RawSample, None, set[str]]:
    """Yield the samples of one shard whose keys are in ``keys``; return the keys not seen.

    Stops reading as soon as every key was seen. A shard that cannot be read reports its keys
    as missing (with the reason) and returns none.
    """
    search.shards_read += 1
    left = set(keys)
    try:
        with contextlib.closing(iter_shard_samples(pool.fs, shard.path, read_data=read_data)) as walk:
            for sample in walk:
                if sample.key in left:
                    left.discard(sample.key)
                    yield sample
                    if not left:
                        break
    except (PoolError, OSError) as err:
        search.missing.update((key, f"shard {shard.uri} could not be read: {err}") for key in left)
        return set()
    return left


def _find_samples(
    wanted: Mapping[str, str | None], pool: ResolvedPool, *, read_data: bool, search_pool: bool = False
) -> tuple[Iterator[RawSample], _Search]:
    """The wanted samples (key -> shard URI the selection recorded), each shard read at most once.

    Shards are matched by URI, then by file name (a pool copied elsewhere keeps its shard
    names). With ``search_pool``, keys not found where recorded are looked for in the pool's
    other shards. ``search.missing`` is complete once the iterator is drained.
    """
    by_uri = {s.uri: s for s in pool.shards}
    by_name: dict[str, ShardRef] = {}
    for shard in pool.shards:
        by_name.setdefault(_basename(shard.uri), shard)
    search = _Search()
    planned: dict[str, set[str]] = {}
    unplaced: set[str] = set()
    for key, shard_uri in wanted.items():
        shard = by_uri.get(shard_uri or "") or by_name.get(_basename(shard_uri or ""))
        if shard is None:
            unplaced.add(key)
            if not search_pool:
                search.missing[key] = f"its shard {shard_uri!r} is not in pool {pool.uri}"
        else:
            planned.setdefault(shard.uri, set()).add(key)

    def samples() -> Iterator[RawSample]:
        roaming = set(unplaced) if search_pool else set()
        for uri, keys in planned.items():
            left = yield from _scan(pool, by_uri[uri], keys, read_data, search)
            if search_pool:
                roaming |= left
            else:
                search.missing.update((key, f"not in shard {uri}") for key in left)
        for shard in pool.shards:
            if not roaming:
                break
            if shard.uri not in planned:
                roaming = yield from _scan(pool, shard, roaming, read_data, search)
        search.missing.update((key, f"not found in any shard of pool {pool.uri}") for key in roaming)

    return samples(), search


def _image_ext(sample: RawSample) -> str:
    found = [ext for ext in IMAGE_EXTENSIONS if ext in sample.files]
    if len(found) != 1:
        raise ValueError(
            f"sample {sample.key!r} in {sample.shard} has {len(found)} image files ({', '.join(found) or 'none'})"
        )
    return found[0]


def _wanted(selection: pa.Table) -> dict[str, str | None]:
    return dict(zip(selection.column("key").to_pylist(), selection.column("shard").to_pylist()))


def _pool_of(run: CommittedRun, pool: str | None) -> ResolvedPool:
    uri = pool or run.manifest.inputs.get("pool", {}).get("uri")
    if not uri:
        raise ValueError(f"run {run.uri} records no pool URI; pass the pool explicitly")
    return resolve_pool(uri, run.storage_options)


def image_extensions(
    run: CommittedRun, keys: Sequence[str] | None = None, *, pool: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The image file extension of each selected key, as stored in the pool.

    A pool whose index names one encoding answers without reading a shard; otherwise the
    shards holding the keys are walked header by header (payloads skipped).

    Args:
        run: From :func:`open_run`.
        keys: Keys to look up (default: the whole selection).
        pool: Pool URI overriding the one in the manifest (a copy of it elsewhere).

    Returns:
        ``(extensions, missing)``: key -> extension, and key -> reason for keys not found.
    """
    selection = run.selection()
    wanted = _wanted(selection)
    if keys is not None:
        wanted = {k: wanted.get(k) for k in keys}
    resolved = _pool_of(run, pool)
    encoding = resolved.index.image_encoding if resolved.index is not None else None
    if encoding in IMAGE_EXTENSIONS:
        return {key: str(encoding) for key in wanted}, {}
    samples, search = _find_samples(wanted, resolved, read_data=False)
    extensions = {s.key: _image_ext(s) for s in samples}
    return extensions, search.missing


# -- export ---------------------------------------------------------------------------------------


def _image_url(prefix: str, key: str, ext: str) -> str:
    # Web URLs need the key percent-encoded; object-store URIs and paths take it as it is.
    name = urllib.parse.quote(key, safe="/") if prefix.startswith(("http://", "https://")) else key
    return f"{prefix.rstrip('/')}/{name}.{ext}"


def _export_bytes(rows: list[dict[str, Any]], columns: list[str], fmt: str, run_id: str) -> bytes:
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if row[c] is None else row[c]) for c in columns} for row in rows)
        return text.getvalue().encode()
    if fmt == "jsonl":
        return "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows).encode()
    if fmt == "label-studio":
        tasks = [
            {
                "data": {
                    "image": row["image"],
                    "key": row["key"],
                    "score": row["score"],
                    "rank": row["rank"],
                    "run_id": run_id,
                }
            }
            for row in rows
        ]
        return (json.dumps(tasks, indent=1, allow_nan=False) + "\n").encode()
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def export_selection(
    run: CommittedRun,
    fmt: str,
    out: str | None,
    *,
    image_url_prefix: str | None = None,
    image_ext: str | None = None,
    pool: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> bytes:
    """Write the selection as CSV, JSON Lines or a Label Studio task-import file.

    CSV and JSON Lines hold every selection column in rank order (NaN as empty / ``null``), plus
    an ``image`` column when ``image_url_prefix`` is given. The Label Studio file is a JSON list
    of ``{"data": {"image": URL, "key", "score", "rank", "run_id"}}`` tasks with
    ``URL = {image_url_prefix}/{key}.{ext}``: point the prefix at where :func:`extract_images`
    put the images (an ``s3://`` prefix behind Label Studio cloud storage, or an ``https://`` base).

    Args:
        run: From :func:`open_run`.
        fmt: One of :data:`EXPORT_FORMATS`.
        out: Destination file (local path or fsspec URI), or ``None`` to only return the bytes.
        image_url_prefix: Base of the image URLs (required for ``label-studio``).
        image_ext: Extension of every image; by default looked up in the pool (:func:`image_extensions`).
        pool: Pool URI overriding the manifest's, for the extension lookup.
        storage_options: fsspec options for ``out`` (default: the run's).

    Returns:
        The bytes written.

    Raises:
        ValueError: On an unknown format, ``label-studio`` without a prefix, or keys whose image
            extension cannot be found (named).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "label-studio" and not image_url_prefix:
        raise ValueError(
            "label-studio export needs --image-url-prefix: the base the image URLs start with, "
            "e.g. where `lplgrad manifest extract` put the images"
        )
    selection = run.selection()
    rows = [{k: _plain(v) for k, v in row.items()} for row in selection.to_pylist()]
    columns = list(selection.column_names)
    if image_url_prefix:
        if image_ext:
            extensions, missing = {row["key"]: image_ext.lstrip(".") for row in rows}, {}
        else:
            try:
                extensions, missing = image_extensions(run, pool=pool)
            except PoolError as err:
                raise ValueError(
                    f"cannot look up the image extensions in the pool ({err}); pass --pool with "
                    "its current location, or --image-ext"
                ) from err
        if missing:
            listed = "; ".join(f"{k}: {why}" for k, why in sorted(missing.items())[:10])
            raise ValueError(
                f"no image found for {len(missing)} selected key(s) ({listed}); pass --pool with "
                "the pool's current location, or --image-ext"
            )
        for row in rows:
            row["image"] = _image_url(image_url_prefix, row["key"], extensions[row["key"]])
        columns.append("image")
    data = _export_bytes(rows, columns, fmt, run.run_id)
    if out is not None:
        fs, path = filesystem_for(out, run.storage_options if storage_options is None else storage_options)
        write_bytes_atomic(fs, path, data)
    return data


# -- extract --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract_images` wrote.

    Attributes:
        out: Destination prefix as given.
        written: Key -> URI of the image file written.
        missing: Key -> reason, for selected keys whose image was not written.
        shards_read: Shards opened.
        bytes_written: Image bytes written.
    """

    out: str
    written: dict[str, str]
    missing: dict[str, str]
    shards_read: int
    bytes_written: int


def _write_image(fs: AbstractFileSystem, out_path: str, sample: RawSample) -> tuple[str, int]:
    validate_key(sample.key)  # no "..", no leading "/": a key cannot escape the destination
    ext = _image_ext(sample)
    path = join_path(out_path, f"{sample.key}.{ext}")
    data = sample.files[ext]
    write_bytes_atomic(fs, path, data)
    return display_uri(fs, path), len(data)


def extract_images(
    run: CommittedRun,
    out: str,
    *,
    pool: str | None = None,
    search_pool: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> ExtractReport:
    """Copy the selected images out of the pool's shards to ``{out}/{key}.{ext}``.

    The shards the selection names are read once each, in selection order of first mention;
    only the selected samples' image members are written, byte for byte (nothing is decoded,
    ``.pickle``/``.pth`` members are never loaded). Existing files of the same name are replaced.

    Args:
        run: From :func:`open_run`.
        out: Destination: a local folder or any fsspec prefix.
        pool: Pool URI overriding the manifest's (the pool copied elsewhere; shards are
            matched by file name).
        search_pool: Also read the pool's other shards for keys not found where recorded.
        storage_options: fsspec options for ``out`` (default: the run's).

    Returns:
        The report; ``missing`` names every selected key that was not written, with why.
    """
    selection = run.selection()
    resolved = _pool_of(run, pool)
    out_fs, out_path = filesystem_for(out, run.storage_options if storage_options is None else storage_options)
    samples, search = _find_samples(_wanted(selection), resolved, read_data=True, search_pool=search_pool)
    written: dict[str, str] = {}
    problems: dict[str, str] = {}
    total = 0
    for sample in samples:
        try:
            written[sample.key], size = _write_image(out_fs, out_path, sample)
        except ValueError as err:
            problems[sample.key] = str(err)
            continue
        total += size
    return ExtractReport(out, written, {**search.missing, **problems}, search.shards_read, total)
