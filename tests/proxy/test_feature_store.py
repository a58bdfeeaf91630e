"""The feature store format on its own (no Ray): rows, generations, incremental plans, commits."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.proxy.store import (
    Backbone,
    FeatureStoreError,
    StoreShard,
    commit_store,
    features_matrix,
    features_table,
    generation_uri,
    open_store,
    plan_extraction,
)

BACKBONE = Backbone(sha256="a" * 64, source="ckpt", model="small_cnn", dim=3)


def write_generation(store: str, generation: str, shard: str, keys: list[str], offset: float) -> None:
    directory = generation_uri(store, generation)
    import os

    os.makedirs(directory, exist_ok=True)
    features = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3) + offset
    pq.write_table(
        features_table(keys, [shard] * len(keys), generation, features, [None] * len(keys)),
        f"{directory}/{shard.rsplit('/', 1)[-1]}.parquet",
    )


def test_rows_keep_error_rows_as_null_features():
    table = features_table(
        ["a", "b", None], ["s"] * 3, "g1", np.ones((3, 2), np.float32) * 7, [None, "cannot decode", "shard unreadable"]
    )
    assert table.column("features").null_count == 2
    matrix = features_matrix(table)
    assert matrix.shape == (3, 2)
    np.testing.assert_array_equal(matrix, [[7, 7], [0, 0], [0, 0]])


def test_plan_reuses_only_unchanged_shards_of_the_same_backbone(tmp_path):
    store = str(tmp_path / "store")
    shards = [
        StoreShard("p/0.tar", {"size": 10, "etag": "x"}, "g1", 5, 0),
        StoreShard("p/1.tar", {"size": 10, "etag": "y"}, "g1", 5, 0),
    ]
    previous = commit_store(store, "p", BACKBONE, shards)
    now = {
        "p/0.tar": {"size": 10, "etag": "x"},
        "p/1.tar": {"size": 11, "etag": "z"},
        "p/2.tar": {"size": 3, "etag": "n"},
    }
    plan = plan_extraction(previous, BACKBONE, "p", now)
    assert set(plan.reuse) == {"p/0.tar"} and plan.extract == ["p/1.tar", "p/2.tar"]
    other = Backbone(sha256="b" * 64, source="other", model="small_cnn", dim=3)
    assert plan_extraction(previous, other, "p", now).extract == list(now)
    assert "backbone changed" in plan_extraction(previous, other, "p", now).reason
    assert plan_extraction(previous, BACKBONE, "q", now).extract == list(now)
    assert plan_extraction(previous, BACKBONE, "p", {"p/0.tar": None}).extract == [
        "p/0.tar"
    ]  # unknown identity: re-extract
    assert plan_extraction(previous, BACKBONE, "p", now, incremental=False).extract == list(now)
    assert plan_extraction(None, BACKBONE, "p", now).extract == list(now)


def test_only_current_generations_are_read_and_dead_ones_are_deleted(tmp_path):
    store = str(tmp_path / "store")
    write_generation(store, "g1", "p/0.tar", ["a", "b"], 0.0)
    write_generation(store, "g1", "p/1.tar", ["c"], 0.0)
    commit_store(
        store, "p", BACKBONE, [StoreShard("p/0.tar", None, "g1", 2, 0), StoreShard("p/1.tar", None, "g1", 1, 0)]
    )
    # Shard 1 is re-extracted into g2 (its key changed); g3 is a failed run that never committed.
    write_generation(store, "g2", "p/1.tar", ["d"], 100.0)
    write_generation(store, "g3", "p/0.tar", ["a", "b"], 500.0)
    assert sorted(open_store(store).find(["a", "b", "c"])[0]) == ["a", "b", "c"]  # g2/g3 invisible before the commit
    committed = commit_store(
        store, "p", BACKBONE, [StoreShard("p/0.tar", None, "g1", 2, 0), StoreShard("p/1.tar", None, "g2", 1, 0)]
    )
    assert not (tmp_path / "store" / "generations" / "g3").exists()
    assert (tmp_path / "store" / "generations" / "g1").exists()
    reopened = open_store(store)
    keys = [k for t in reopened.iter_tables(("key",)) for k in t.column("key").to_pylist()]
    assert sorted(keys) == ["a", "b", "d"]  # c lives on in g1's files but is not current
    np.testing.assert_array_equal(reopened.lookup(["d", "a"]), [[100, 101, 102], [0, 1, 2]])
    assert committed.num_rows == 3 and json.loads((tmp_path / "store" / "store.json").read_text())["rows"] == 3


def test_lookup_names_missing_and_failed_keys(tmp_path):
    store = str(tmp_path / "store")
    directory = generation_uri(store, "g1")
    import os

    os.makedirs(directory)
    pq.write_table(
        features_table(["a", "bad"], ["p/0.tar"] * 2, "g1", np.zeros((2, 3), np.float32), [None, "cannot decode png"]),
        f"{directory}/part.parquet",
    )
    commit_store(store, "p", BACKBONE, [StoreShard("p/0.tar", None, "g1", 2, 1)])
    with pytest.raises(FeatureStoreError, match="bad: cannot decode png.*nope: not in the store"):
        open_store(store).lookup(["a", "bad", "nope"])


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(FeatureStoreError, match="has no store.json"):
        open_store(str(tmp_path))
    assert open_store(str(tmp_path), missing_ok=True) is None
    (tmp_path / "store.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(FeatureStoreError, match="not an lplgrad feature store"):
        open_store(str(tmp_path))


def test_of_two_extractions_from_the_same_version_only_one_commits(tmp_path):
    store = str(tmp_path / "store")
    write_generation(store, "20260101T000000-aaaa", "p/0.tar", ["a"], 0.0)
    first = commit_store(
        store,
        "p",
        BACKBONE,
        [StoreShard("p/0.tar", None, "20260101T000000-aaaa", 1, 0)],
        based_on=0,
        generation="20260101T000000-aaaa",
    )
    assert first.sequence == 1 and first.claim == "exclusive"  # recorded in the index, and read back
    assert json.loads((tmp_path / "store" / "store.json").read_text())["claim"] == "exclusive"
    # Two extractions both started from version 1; each wrote its own generation.
    write_generation(store, "20260102T000000-bbbb", "p/0.tar", ["a"], 10.0)
    write_generation(store, "20260102T000001-cccc", "p/0.tar", ["a"], 20.0)
    winner = commit_store(
        store,
        "p",
        BACKBONE,
        [StoreShard("p/0.tar", None, "20260102T000000-bbbb", 1, 0)],
        based_on=1,
        generation="20260102T000000-bbbb",
    )
    assert (tmp_path / "store" / "generations" / "20260102T000001-cccc").exists()  # started later: maybe still writing
    before = (tmp_path / "store" / "store.json").read_bytes()
    with pytest.raises(FeatureStoreError, match=r"committed version 2 of .* \(run it again"):
        commit_store(
            store,
            "p",
            BACKBONE,
            [StoreShard("p/0.tar", None, "20260102T000001-cccc", 1, 0)],
            based_on=1,
            generation="20260102T000001-cccc",
        )
    assert (tmp_path / "store" / "store.json").read_bytes() == before
    assert not (tmp_path / "store" / "generations" / "20260102T000001-cccc").exists()  # the loser cleaned up
    reopened = open_store(store)
    assert reopened.sequence == winner.sequence == 2
    np.testing.assert_array_equal(reopened.lookup(["a"]), [[10, 11, 12]])


def test_a_commit_killed_before_store_json_is_rolled_forward(tmp_path):
    store = str(tmp_path / "store")
    write_generation(store, "g1", "p/0.tar", ["a"], 0.0)
    commit_store(store, "p", BACKBONE, [StoreShard("p/0.tar", None, "g1", 1, 0)])
    write_generation(store, "g2", "p/0.tar", ["a"], 5.0)
    commit_store(store, "p", BACKBONE, [StoreShard("p/0.tar", None, "g2", 1, 0)])
    (tmp_path / "store" / "store.json").write_text(
        (tmp_path / "store" / "commits" / "00000001.json").read_text()
    )  # as if killed
    reopened = open_store(store)
    assert reopened.sequence == 2 and reopened.current == {"p/0.tar": "g2"}
    (tmp_path / "store" / "store.json").unlink()  # killed before the very first store.json
    assert open_store(store).sequence == 2


def test_a_store_on_s3_is_committed_exclusively_and_says_so(s3_server):
    store, options = s3_server.uri("store"), s3_server.storage_options
    committed = commit_store(store, "p", BACKBONE, [], options, based_on=0)
    assert committed.claim == "exclusive" and open_store(store, options).claim == "exclusive"
    with pytest.raises(FeatureStoreError, match="committed version 1"):
        commit_store(store, "p", BACKBONE, [], options, based_on=0)
