"""The query's row filters: excluded rows are dropped before decoding and recorded once per key,
however often Ray runs the task that drops them (each block's rows as one part, read by the driver)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs._shared.row_filters import DroppedParts, ExcludedRowSet, drop_excluded, prefilter_raw, store_prefilter


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


def test_excluded_raw_rows_are_dropped_before_decoding_and_recorded_once_per_key(tmp_path) -> None:
    recorded = DroppedParts(str(tmp_path / "dropped"))
    assert recorded.read() == []  # no block dropped anything: no folder, no rows
    excluded = frozenset({"b", "d", "not-in-this-batch"})
    for _ in range(3):  # a retried or re-executed read task filters the same rows again
        kept = prefilter_raw(raw_batch(), excluded, None, 0, dropped_to=recorded, shard_prefix="s3://")
        assert kept["__key__"].tolist() == ["a", "c", "e"] and kept["png"].tolist() == [b"a", b"c", b"e"]
    assert len(list((tmp_path / "dropped").iterdir())) == 1  # the same part, rewritten
    assert sorted(recorded.read()) == [("b", "s3://bucket/p/s0.tar"), ("d", "s3://bucket/p/s1.tar")]
    # Rows outside the subset or the `only` keys are not read at all, so they are not "excluded".
    only = DroppedParts(str(tmp_path / "only"))
    kept = prefilter_raw(raw_batch(), excluded, None, 0, only={"bucket/p/s0.tar": frozenset({"a"})}, dropped_to=only)
    assert kept["__key__"].tolist() == ["a", "e"]
    assert only.read() == [("d", "bucket/p/s1.tar")]
    with pytest.raises(ValueError, match="nowhere to record"):
        prefilter_raw(raw_batch(), excluded, None, 0)


def test_parts_of_blocks_cut_differently_count_each_key_once(tmp_path) -> None:
    # A re-executed read may cut its blocks elsewhere: its parts differ, the driver's set does not.
    recorded = DroppedParts(str(tmp_path / "dropped"))
    excluded = frozenset({"b", "d", "e"})
    prefilter_raw(raw_batch(), excluded, None, 0, dropped_to=recorded)
    halves = raw_batch()
    for part in (slice(0, 2), slice(2, 5)):
        prefilter_raw({name: values[part] for name, values in halves.items()}, excluded, None, 0, dropped_to=recorded)
    assert len(list((tmp_path / "dropped").iterdir())) == 3 and len(recorded.read()) == 6
    rows = ExcludedRowSet()
    rows.add(recorded.read())
    assert sorted(rows.rows()) == [("b", "bucket/p/s0.tar"), ("d", "bucket/p/s1.tar"), ("e", "bucket/p/s1.tar")]


def test_excluded_store_rows_are_dropped_and_recorded_once_per_key(tmp_path) -> None:
    store_rows = pa.table(
        {
            "key": ["a", "b", None],
            "shard": ["s0", "s1", "s1"],
            "generation": ["g", "g", "g"],
            "error": pa.array([None, None, "shard unreadable"], pa.string()),
        }
    )
    recorded = DroppedParts(str(tmp_path / "dropped"))
    for _ in range(2):
        kept = store_prefilter(store_rows, {"s0": "g", "s1": "g"}, frozenset({"b"}), None, 0, dropped_to=recorded)
        assert kept.column("key").to_pylist() == ["a", None] and "generation" not in kept.column_names
    assert recorded.read() == [("b", "s1")]
