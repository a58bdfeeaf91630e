"""The query's row filters: excluded rows are dropped before decoding and recorded once per key,
however often Ray runs the task that drops them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray

from ray_jobs._shared.row_filters import ExcludedRows, ExcludedRowSet, drop_excluded, prefilter_raw, store_prefilter


def raw_batch() -> dict[str, np.ndarray]:
    """Raw rows as `read_webdataset` gives them: keys, protocol-stripped shard paths, payload bytes."""
    keys = ["a", "b", "c", "d", "e"]
    return {
        "__key__": np.array(keys, dtype=object),
        "__url__": np.array(["bucket/p/s0.tar"] * 3 + ["bucket/p/s1.tar"] * 2, dtype=object),
        "png": np.array([k.encode() for k in keys], dtype=object),
    }


def test_a_row_set_keeps_one_row_per_key() -> None:
    rows = ExcludedRowSet()
    rows.add([("a", "s0"), ("b", "s0")])
    rows.add([("a", "s0"), ("c", "s1")])
    assert rows.rows() == [("a", "s0"), ("b", "s0"), ("c", "s1")] and len(rows) == 3


def test_drop_excluded_splits_a_table_and_never_drops_keyless_rows() -> None:
    table = pa.table({"key": ["a", None, "b", "c"], "shard": ["s0", "s1", "s0", "s1"], "score": [1.0, None, 2.0, 3.0]})
    kept, dropped = drop_excluded(table, frozenset({"a", "c"}))
    assert kept.column("key").to_pylist() == [None, "b"] and dropped == [("a", "s0"), ("c", "s1")]
    assert drop_excluded(table, frozenset()) == (table, [])


def test_excluded_raw_rows_are_dropped_before_decoding_and_recorded_once_per_key(ray_local) -> None:
    recorded = ExcludedRows.remote()
    excluded = frozenset({"b", "d", "not-in-this-batch"})
    for _ in range(3):  # a retried or re-executed read task filters the same rows again
        kept = prefilter_raw(raw_batch(), excluded, None, 0, excluded_rows=recorded, shard_prefix="s3://")
        assert kept["__key__"].tolist() == ["a", "c", "e"] and kept["png"].tolist() == [b"a", b"c", b"e"]
    assert sorted(ray.get(recorded.rows.remote())) == [("b", "s3://bucket/p/s0.tar"), ("d", "s3://bucket/p/s1.tar")]
    # Rows outside the subset or the `only` keys are not read at all, so they are not "excluded".
    only = ExcludedRows.remote()
    kept = prefilter_raw(raw_batch(), excluded, None, 0, only={"bucket/p/s0.tar": frozenset({"a"})}, excluded_rows=only)
    assert kept["__key__"].tolist() == ["a", "e"]
    assert ray.get(only.rows.remote()) == [("d", "bucket/p/s1.tar")]
    with pytest.raises(ValueError, match="nowhere to record"):
        prefilter_raw(raw_batch(), excluded, None, 0)


def test_excluded_store_rows_are_dropped_and_recorded_once_per_key(ray_local) -> None:
    store_rows = pa.table(
        {
            "key": ["a", "b", None],
            "shard": ["s0", "s1", "s1"],
            "generation": ["g", "g", "g"],
            "error": pa.array([None, None, "shard unreadable"], pa.string()),
        }
    )
    recorded = ExcludedRows.remote()
    for _ in range(2):
        kept = store_prefilter(store_rows, {"s0": "g", "s1": "g"}, frozenset({"b"}), None, 0, excluded_rows=recorded)
        assert kept.column("key").to_pylist() == ["a", None] and "generation" not in kept.column_names
    assert ray.get(recorded.rows.remote()) == [("b", "s1")]
