"""Turn annotators' answers into the next labeled set: pool + labels table -> labeled pool.

The labeled set is a pool of the same format whose samples all carry ``cls``. It is
written to a new prefix each time (the previous cycle's set stays intact, so every cycle
can be reproduced); with ``append_to`` the new pool holds the previous set's samples
first, then the newly labeled ones in pool order.

A labels table is CSV (header ``key,label``) or Parquet with columns ``key`` and ``label``.
A label is a class index (``3``) or a class name (``sandal``); either must be in the
class list. Any key the pool lacks is an error, and so is a key labeled twice with
different labels; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

from pipeline.pools.errors import LabelError
from pipeline.pools.format import LABEL_EXTENSION, PoolIndex
from pipeline.pools.listing import ResolvedPool, resolve_pool
from pipeline.pools.scan import iter_pool_samples
from pipeline.pools.writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, PoolWriter
from pipeline.storage import filesystem_for

__all__ = ["LabelReport", "label_pool", "read_labels", "read_labels_table", "resolve_label"]

_SHOW = 10


def read_labels_table(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Read a ``key,label`` table (CSV, or Parquet by extension ``.parquet``/``.pq``).

    Args:
        uri: Table location (any fsspec URI).
        storage_options: fsspec options for ``uri``.

    Returns:
        Key -> label text (index or class name, resolved later against the class list).

    Raises:
        LabelError: Missing columns, empty cells, or a key given two different labels.
    """
    fs, path = filesystem_for(uri, storage_options)
    with fs.open(path, "rb") as f:
        if path.lower().endswith((".parquet", ".pq")):
            table = pa_parquet.ParquetFile(f).read()  # read_table on a handle can abort at exit (pyarrow 26)
        else:
            # Everything as strings: "007" must stay a key, and labels may be names.
            table = pa_csv.read_csv(
                f,
                convert_options=pa_csv.ConvertOptions(
                    column_types={"key": pa.string(), "label": pa.string()}, strings_can_be_null=False
                ),
            )
    missing = [c for c in ("key", "label") if c not in table.column_names]
    if missing:
        raise LabelError(
            f"labels table {uri} lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)}); "
            "expected a header key,label"
        )
    keys = table.column("key").to_pylist()
    values = table.column("label").to_pylist()
    labels: dict[str, str] = {}
    for row, (key, value) in enumerate(zip(keys, values), start=1):
        if key is None or value is None or str(key).strip() == "" or str(value).strip() == "":
            raise LabelError(f"labels table {uri}, row {row}: empty key or label")
        key, value = str(key).strip(), str(value).strip()
        if labels.setdefault(key, value) != value:
            raise LabelError(f"labels table {uri}: key {key!r} has two labels, {labels[key]!r} and {value!r}")
    return labels


def resolve_label(value: int | str, classes: Sequence[str], key: str = "?") -> int:
    """Map a label (class index or class name) to a class index.

    Args:
        value: ``3``, ``"3"`` or a class name.
        classes: The class list.
        key: The sample key, for the error message.

    Returns:
        The index into ``classes``.

    Raises:
        LabelError: If the label is neither an index in range nor a class name.
    """
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(classes):
            return index
    elif text in classes:
        return classes.index(text)
    shown = ", ".join(classes[:_SHOW]) + (", ..." if len(classes) > _SHOW else "")
    raise LabelError(
        f"label {text!r} for key {key!r} is outside the class list: expected an index in "
        f"[0, {len(classes)}) or one of [{shown}]"
    )


@dataclass(frozen=True)
class LabelReport:
    """What :func:`label_pool` wrote.

    Attributes:
        index: The new labeled pool's index.
        added: Newly labeled samples.
        carried: Samples carried over from ``append_to``.
        already_labeled: Table rows skipped because ``append_to`` had them with the same label.
    """

    index: PoolIndex
    added: int
    carried: int
    already_labeled: int


def _class_list(pool: ResolvedPool, base: ResolvedPool | None, classes: Sequence[str] | None) -> tuple[str, ...]:
    known = [(p.uri, p.classes) for p in (pool, base) if p is not None and p.classes is not None]
    if classes is not None:
        known.insert(0, ("--classes", tuple(classes)))
    if not known:
        raise LabelError(f"no class list: {pool.uri} has no index with classes; pass one (--classes a,b,c)")
    for where, other in known[1:]:
        if tuple(other) != tuple(known[0][1]):
            raise LabelError(f"class lists differ: {known[0][0]} has {list(known[0][1])}, {where} has {list(other)}")
    return tuple(known[0][1])


def label_pool(
    pool_uri: str,
    labels: str | Mapping[str, int | str],
    out_uri: str,
    *,
    append_to: str | None = None,
    classes: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> LabelReport:
    """Write a labeled pool from ``pool_uri`` and a labels table, optionally after an existing set.

    Args:
        pool_uri: The (unlabeled) pool the keys refer to.
        labels: A labels table URI, or a mapping key -> label.
        out_uri: New prefix for the labeled pool.
        append_to: An existing labeled pool whose samples come first.
        classes: Class list for pools without one (must agree with the pools' when both exist).
        storage_options: fsspec options for every URI.
        shard_samples: Maximum samples per output shard.
        shard_bytes: Target maximum bytes per output shard.

    Returns:
        A :class:`LabelReport`.

    Raises:
        LabelError: Unknown keys, labels outside the class list, conflicting labels, an
            empty table, or an ``append_to`` pool with unlabeled samples. Nothing is left at
            ``out_uri`` then.
        PoolExistsError: If ``out_uri`` already holds a pool.
        PoolNotFoundError, EmptyPoolError, DuplicateKeyError, ShardFormatError: Bad input pools.
    """
    pool = resolve_pool(pool_uri, storage_options)
    base = resolve_pool(append_to, storage_options) if append_to else None
    class_list = _class_list(pool, base, classes)
    raw = read_labels_table(labels, storage_options) if isinstance(labels, str) else dict(labels)
    if not raw:
        raise LabelError(f"labels table {labels if isinstance(labels, str) else '(mapping)'} is empty")
    wanted = {key: resolve_label(value, class_list, key) for key, value in raw.items()}
    source = {
        "kind": "label",
        "pool": pool_uri,
        "labels": labels if isinstance(labels, str) else None,
        "append_to": append_to,
    }
    with PoolWriter(
        out_uri,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        storage_options=storage_options,
        classes=class_list,
        source=source,
    ) as writer:
        carried, already = 0, 0
        if base is not None:
            for sample in iter_pool_samples(base):
                cls = sample.files.get(LABEL_EXTENSION)
                if cls is None:
                    raise LabelError(
                        f"{append_to} is not a labeled set: sample {sample.key!r} in {sample.shard} has no cls"
                    )
                if sample.key in wanted:
                    if int(cls) != wanted[sample.key]:
                        raise LabelError(
                            f"key {sample.key!r} is labeled {int(cls)} in {append_to} ({sample.shard}) "
                            f"but {wanted[sample.key]} in the labels table"
                        )
                    del wanted[sample.key]
                    already += 1
                writer.write(sample.key, sample.files)
                carried += 1
        added = 0
        for sample in iter_pool_samples(pool):
            if sample.key in wanted:
                files = {**sample.files, LABEL_EXTENSION: str(wanted.pop(sample.key)).encode("ascii")}
                writer.write(sample.key, files)
                added += 1
        if wanted:
            shown = ", ".join(repr(k) for k in sorted(wanted)[:_SHOW])
            raise LabelError(
                f"{len(wanted)} labeled key(s) are not in {pool_uri}: {shown}" + (" ..." if len(wanted) > _SHOW else "")
            )
        index = writer.close()
    return LabelReport(index=index, added=added, carried=carried, already_labeled=already)


def read_labels(
    pool_uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """(keys, labels [N], class names) of a labeled pool, read from its `cls` members.

    Raises:
        LabelError: a sample without a label, or a pool without any sample.
    """
    pool = resolve_pool(pool_uri, storage_options)
    keys, labels = [], []
    for sample in iter_pool_samples(pool):
        if "cls" not in sample.files:
            raise LabelError(
                f"sample {sample.key} of {pool_uri} has no label (cls); label it with `lplgrad pool label`"
            )
        keys.append(sample.key)
        labels.append(int(sample.files["cls"].decode().strip()))
    if not keys:
        raise LabelError(f"{pool_uri} has no labeled samples")
    classes = list(pool.classes) if pool.classes else [str(c) for c in range(max(labels) + 1)]
    return keys, np.array(labels), classes
