"""Building pools: deterministic shards, rotation, index written last, clean failures."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator

import pytest

from pipeline.pools import (
    DuplicateKeyError,
    EmptyPoolError,
    PoolExistsError,
    PoolWriter,
    SourceSample,
    UnfinishedPoolError,
    build_pool,
    iter_pool_samples,
    member_header,
    resolve_pool,
    synthetic,
)


def test_same_input_builds_byte_identical_shards(store) -> None:
    first = build_pool(synthetic(40, seed=3), store.uri("a"), shard_samples=16, storage_options=store.storage_options)
    second = build_pool(synthetic(40, seed=3), store.uri("b"), shard_samples=16, storage_options=store.storage_options)
    assert [s.name for s in first.shards] == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    assert first.shards == second.shards
    for shard in first.shards:
        assert store.read(f"a/{shard.name}") == store.read(f"b/{shard.name}")
    keys = [s.key for s in iter_pool_samples(resolve_pool(store.uri("a"), store.storage_options))]
    assert keys == [f"synthetic_train_{i:06d}" for i in range(40)]
    other = build_pool(synthetic(40, seed=4), store.uri("c"), shard_samples=16, storage_options=store.storage_options)
    assert store.read("c/pool-000000.tar") != store.read("a/pool-000000.tar")
    assert other.num_samples == 40


def test_index_records_real_sizes_counts_and_classes(store) -> None:
    index = build_pool(
        synthetic(25, seed=0, num_classes=4), store.uri("p"), shard_samples=10, storage_options=store.storage_options
    )
    doc = json.loads(store.read("p/index.json"))
    assert doc["num_samples"] == 25 and [s["samples"] for s in doc["shards"]] == [10, 10, 5]
    for shard in doc["shards"]:
        assert shard["bytes"] == len(store.read(f"p/{shard['name']}"))
    assert doc["classes"] == list(index.classes) and len(doc["classes"]) == 4
    assert doc["labeled"] is True and doc["image_encoding"] == "png"
    assert doc["source"]["kind"] == "synthetic" and doc["source"]["seed"] == 0
    assert doc["created"].endswith("Z")


def test_rotation_by_bytes(local_store) -> None:
    index = build_pool(synthetic(30, seed=0), local_store.uri("p"), shard_bytes=40_000)
    assert len(index.shards) > 1
    assert all(s.bytes <= 40_000 + 10_240 for s in index.shards)  # + one tar record of padding
    assert index.num_samples == 30


def test_index_is_written_only_after_the_last_shard(store) -> None:
    writer = PoolWriter(store.uri("p"), shard_samples=2, storage_options=store.storage_options)
    for sample in synthetic(5):
        writer.write(sample.key, {"png": b"x", "cls": b"1"})
    assert store.exists("p/pool-000001.tar")
    assert not store.exists("p/index.json")
    index = writer.close()
    assert store.exists("p/index.json") and index.num_samples == 5


def test_existing_pool_is_not_overwritten(store) -> None:
    build_pool(synthetic(3), store.uri("p"), storage_options=store.storage_options)
    with pytest.raises(PoolExistsError, match="already holds a pool"):
        build_pool(synthetic(3), store.uri("p"), storage_options=store.storage_options)


def _failing_source() -> Iterator[SourceSample]:
    yield from synthetic(5)
    raise RuntimeError("source broke")


class _Source:
    classes = None

    def provenance(self) -> dict:
        return {"kind": "test"}

    def __init__(self, samples) -> None:
        self.samples = samples

    def __iter__(self):
        return iter(self.samples())


def test_failed_build_keeps_finished_partitions_and_resumes(store) -> None:
    # A stream fails after 5 samples: partitions [0, 1] and [2, 3] are finished; [4] never is.
    with pytest.raises(RuntimeError, match="source broke"):
        build_pool(_Source(_failing_source), store.uri("p"), shard_samples=2, storage_options=store.storage_options)
    assert not store.exists("p/index.json") and not store.exists("p/pool-000002.tar")
    assert store.exists("p/pool-000001.tar")
    with pytest.raises(UnfinishedPoolError, match="unfinished pool build"):
        resolve_pool(store.uri("p"), store.storage_options)
    index = build_pool(
        _Source(lambda: iter(synthetic(5))), store.uri("p"), shard_samples=2, storage_options=store.storage_options
    )
    assert index.num_samples == 5 and [s.name for s in index.shards][-1] == "pool-000002.tar"
    assert not store.exists("p/_build/plan.json")


def test_duplicate_key_names_both_shards(local_store) -> None:
    writer = PoolWriter(local_store.uri("p"), shard_samples=2)
    for key in ("a", "b", "c"):
        writer.write(key, {"png": b"x"})
    with pytest.raises(DuplicateKeyError) as info:
        writer.write("a", {"png": b"x"})
    writer.abort()
    assert info.value.first.endswith("pool-000000.tar") and info.value.second.endswith("pool-000001.tar")
    assert "pool-000000.tar" in str(info.value) and "pool-000001.tar" in str(info.value)


def test_empty_source_is_an_error_and_writes_no_index(local_store) -> None:
    with pytest.raises(EmptyPoolError):
        build_pool(_Source(lambda: iter(())), local_store.uri("p"))
    assert not local_store.exists("p/index.json")


@pytest.mark.parametrize(
    ("key", "files", "message"),
    [
        ("a.b", {"png": b"x"}, "invalid sample key"),
        ("a", {}, "no files"),
        ("a", {"png": "text"}, "not bytes"),
        ("a", {"_x": b"x"}, "invalid extension"),
    ],
)
def test_writer_rejects_bad_samples(local_store, key: str, files: dict, message: str) -> None:
    writer = PoolWriter(local_store.uri("p"))
    with pytest.raises(ValueError, match=message):
        writer.write(key, files)


@pytest.mark.parametrize("name", ["a.png", "cat/img_001.cls", "k" * 96 + ".png", "k" * 97 + ".png", "ü/x.png"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 1_000_003])
def test_member_headers_are_the_ones_tarfile_writes(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_shards_are_the_bytes_tarfile_writes(local_store) -> None:
    members = [("a", {"png": b"x" * 700, "cls": b"3"}), ("b/" + "n" * 120, {"jpg": b"y" * 512, "json": b"{}"})]
    writer = PoolWriter(local_store.uri("p"))
    for key, files in members:
        writer.write(key, files)
    writer.close()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, files in members:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(files[ext]),
                    0,
                    0o444,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(files[ext]))
    assert local_store.read("p/pool-000000.tar") == buffer.getvalue()
