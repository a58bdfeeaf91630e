"""Pool index schema, key rules and shard naming."""

from __future__ import annotations

import json
import pickle

import pytest
from braceexpand import braceexpand

from pipeline.pools import (
    DuplicateKeyError,
    LabelError,
    PoolError,
    PoolIndex,
    ShardEntry,
    ShardFormatError,
    ShardReadError,
    brace_pattern,
    shard_name,
    validate_key,
)
from pipeline.pools.format import split_member_name


def _index() -> PoolIndex:
    return PoolIndex(
        shards=(ShardEntry("pool-000000.tar", 3, 10240), ShardEntry("pool-000001.tar", 2, 10240)),
        classes=("cat", "dog"),
        labeled=True,
        image_encoding="png",
        created="2026-01-01T00:00:00Z",
        source={"kind": "synthetic", "seed": 1},
    )


def test_index_round_trips_and_has_the_documented_fields() -> None:
    index = _index()
    doc = json.loads(index.to_json())
    assert doc["format"] == "lplgrad-pool" and doc["version"] == 1
    assert doc["num_samples"] == 5
    assert doc["shards"][1] == {"name": "pool-000001.tar", "samples": 2, "bytes": 10240}
    assert doc["classes"] == ["cat", "dog"] and doc["labeled"] is True
    assert PoolIndex.from_json(index.to_json()) == index


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="something-else"), "not a pool index"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.update(num_samples=6), "sum to 5"),
        (lambda d: (d["shards"].append(dict(d["shards"][0])), d.pop("num_samples")), "twice"),
        (lambda d: d["shards"][0].pop("bytes"), "malformed"),
    ],
)
def test_index_rejects_bad_documents(mutate, message: str) -> None:
    doc = json.loads(_index().to_json())
    mutate(doc)
    with pytest.raises(PoolError, match=message):
        PoolIndex.from_json(json.dumps(doc), where="s3://b/p/index.json")


def test_index_rejects_invalid_json_naming_the_file() -> None:
    with pytest.raises(PoolError, match="s3://b/p/index.json"):
        PoolIndex.from_json("{not json", where="s3://b/p/index.json")


@pytest.mark.parametrize("key", ["a", "train_000001", "cat/img_001", "A-b_c"])
def test_valid_keys(key: str) -> None:
    validate_key(key)


@pytest.mark.parametrize("key", ["", "a.b", "_hidden", "/abs", "a//b", "a/../b", "has space", "tab\t"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(ValueError, match="invalid sample key"):
        validate_key(key)


def test_member_names_split_like_webdataset() -> None:
    assert split_member_name("train/000017.png") == ("train/000017", "png")
    assert split_member_name("a.seg.png") == ("a", "seg.png")
    assert split_member_name("dir.v2/x.cls") == ("dir.v2/x", "cls")
    assert split_member_name("README") is None


def test_brace_pattern_names_exactly_the_shards() -> None:
    assert list(braceexpand(brace_pattern(3))) == [shard_name(i) for i in range(3)]
    assert shard_name(12) == "pool-000012.tar"


@pytest.mark.parametrize(
    "error",
    [
        DuplicateKeyError("k", "s3://b/a.tar", "s3://b/b.tar"),
        ShardFormatError("s3://b/a.tar", "truncated tar"),
        ShardReadError([("s3://b/a.tar", "timeout"), ("s3://b/b.tar", "reset")]),
        LabelError("label 'x' outside the class list"),
    ],
)
def test_errors_survive_pickling(error: Exception) -> None:
    # Errors raised inside Ray tasks reach the driver pickled; their fields must survive.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)
