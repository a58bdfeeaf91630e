"""Ray Data reading: read_webdataset without a decoder, decode tasks, error rows, sharded training iteration."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _pool_iteration import ErrorTally, iter_labeled_batches, split_for_workers

from pipeline.pools import (
    DecodeSpec,
    DuplicateKeyError,
    PoolError,
    PoolWriter,
    ShardReadError,
    build_pool,
    decode_image,
    encode_image,
    resolve_pool,
    sample_files,
    synthetic,
)
from ray_jobs._shared.pool_data import labeled_training_data, read_pool, read_pool_raw

pytestmark = pytest.mark.ray
SPEC = DecodeSpec(3, 32, 32)


def _rows(ds) -> list[dict]:
    return sorted(ds.take_all(), key=lambda r: (r["key"] is None, r["key"] or ""))


def test_read_pool_gives_every_sample_decoded(store, ray_local) -> None:
    uri = store.uri("pool")
    build_pool(synthetic(30, seed=2), uri, shard_samples=12, storage_options=store.storage_options)
    rows = _rows(read_pool(uri, SPEC, storage_options=store.storage_options))
    source = {s.key: s for s in synthetic(30, seed=2)}
    assert [r["key"] for r in rows] == sorted(source)
    assert all(r["error"] is None for r in rows)
    assert [r["label"] for r in rows] == [source[r["key"]].label for r in rows]
    shards = {s.uri for s in resolve_pool(uri, store.storage_options).shards}
    assert {r["shard"] for r in rows} == shards  # full URIs, s3:// included
    for row in rows[::7]:
        expected = decode_image(sample_files(source[row["key"]])["png"], SPEC)
        assert np.array_equal(row["image"], expected)


def test_raw_rows_stay_bytes(local_store, ray_local) -> None:
    build_pool(synthetic(3), local_store.uri("p"), storage_options={})
    raw = read_pool_raw(local_store.uri("p"))
    row = raw.dataset.take(1)[0]
    assert isinstance(row["png"], bytes) and row["cls"] in (b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9")
    assert raw.shard_prefix == "" and raw.bad_shards == () and len(raw.classes) == 10


def test_bad_samples_become_error_rows_and_nothing_is_dropped(local_store, make_tar, ray_local) -> None:
    png = encode_image(next(iter(synthetic(1))).image)
    writer = PoolWriter(local_store.uri("p"), classes=("a", "b", "c"))
    writer.write("good", {"png": png, "cls": b"2"})
    writer.write("not_an_image", {"png": b"%PDF-1.4 not an image", "cls": b"1"})
    writer.write("no_image", {"txt": b"caption only"})
    writer.write("label_outside", {"png": png, "cls": b"7"})
    writer.write("bad_json", {"png": png, "json": b"{oops"})
    writer.close()
    rows = {r["key"]: r for r in read_pool(local_store.uri("p"), SPEC).take_all()}
    assert len(rows) == 5
    assert rows["good"]["error"] is None and rows["good"]["label"] == 2
    assert rows["not_an_image"]["error"] == "not a JPEG, PNG or WebP image"
    assert "no image file" in rows["no_image"]["error"]
    assert "outside the class list (3 classes)" in rows["label_outside"]["error"]
    assert "not valid JSON" in rows["bad_json"]["error"]
    assert all(r["shard"] == local_store.uri("p/pool-000000.tar") for r in rows.values())
    assert all(r["label"] == -1 for k, r in rows.items() if k != "good")


def test_unreadable_shard_is_named_or_becomes_an_error_row(store, ray_local) -> None:
    uri = store.uri("p")
    build_pool(synthetic(9), uri, shard_samples=3, storage_options=store.storage_options)
    store.write("p/pool-000001.tar", store.read("p/pool-000001.tar")[:5000])
    bad = store.uri("p/pool-000001.tar")
    with pytest.raises(ShardReadError, match="pool-000001.tar") as info:
        read_pool(uri, SPEC, storage_options=store.storage_options)
    assert [shard for shard, _ in info.value.problems] == [bad]
    rows = _rows(read_pool(uri, SPEC, storage_options=store.storage_options, on_bad_shard="error_row"))
    assert len(rows) == 7
    shard_row = rows[-1]
    assert shard_row["key"] is None and shard_row["shard"] == bad
    assert shard_row["error"].startswith("shard unreadable: size 5000 bytes")
    assert all(r["error"] is None for r in rows[:-1])


def test_foreign_pool_problems_stop_the_read_before_ray_starts_work(local_store, make_tar, ray_local) -> None:
    png = encode_image(next(iter(synthetic(1))).image)
    local_store.write("dup/a.tar", make_tar([("x.png", png), ("y.png", png)]))
    local_store.write("dup/b.tar", make_tar([("y.png", png)]))
    with pytest.raises(DuplicateKeyError, match="a.tar and again in .*b.tar"):
        read_pool(local_store.uri("dup"), SPEC)
    local_store.write("split/a.tar", make_tar([("x.png", png), ("y.png", png), ("x.cls", b"1")]))
    with pytest.raises(ShardReadError, match="split/a.tar: files of sample 'x' are not adjacent"):
        read_pool(local_store.uri("split"), SPEC)


def test_labeled_pool_is_shuffled_and_split_across_workers(local_store, ray_local) -> None:
    uri = local_store.uri("labeled")
    build_pool(synthetic(48, seed=9), uri, shard_samples=6)
    ds = read_pool(uri, SPEC, batch_size=16)
    iterators = split_for_workers(ds, 2, seed=0)

    def consume(worker: int) -> list[tuple[bytes, int]]:
        out = []
        for images, labels in iter_labeled_batches(iterators[worker], batch_size=8, seed=worker):
            assert images.shape[1:] == (3, 32, 32) and images.dtype.is_floating_point
            out += [(x.numpy().tobytes(), int(y)) for x, y in zip(images, labels)]
        return out

    with ThreadPoolExecutor(2) as pool:  # streaming_split iterators are consumed concurrently
        first, second = (f.result(timeout=120) for f in [pool.submit(consume, 0), pool.submit(consume, 1)])
    assert len(first) == len(second) == 24
    expected = {}
    for sample in synthetic(48, seed=9):
        image = decode_image(sample_files(sample)["png"], SPEC)
        expected[image.tobytes()] = sample.label
    assert set(dict(first)) | set(dict(second)) == set(expected)  # every sample once, disjoint halves
    assert not set(dict(first)) & set(dict(second))
    assert all(expected[f] == y for f, y in first + second)  # labels travel with their images
    source_order = [s for s in expected]
    assert [f for f, _ in first] != source_order[: len(first)]  # shuffled


def test_error_rows_are_counted_and_unlabeled_rows_refused(local_store, ray_local) -> None:
    png = encode_image(next(iter(synthetic(1))).image)
    with PoolWriter(local_store.uri("p")) as writer:
        writer.write("ok", {"png": png, "cls": b"1"})
        writer.write("broken", {"png": b"nope", "cls": b"1"})
        writer.close()
    tally = ErrorTally()
    batches = list(iter_labeled_batches(read_pool(local_store.uri("p"), SPEC), 4, errors=tally))
    assert sum(len(y) for _, y in batches) == 1 and tally.count == 1
    assert tally.examples[0][0] == "broken" and "not a JPEG" in tally.examples[0][2]
    build_pool(synthetic(3), local_store.uri("u"), unlabeled=True)
    with pytest.raises(ValueError, match="has no label"):
        list(iter_labeled_batches(read_pool(local_store.uri("u"), SPEC), 4))


def test_labeled_training_data_for_ray_train(local_store, ray_local) -> None:
    png = encode_image(next(iter(synthetic(1, channels=1, image_size=28))).image)
    with PoolWriter(local_store.uri("train"), classes=("a", "b")) as writer:
        for i in range(6):
            writer.write(f"k{i}", {"png": png, "cls": str(i % 2).encode()})
        writer.write("corrupt", {"png": b"nope", "cls": b"1"})
        writer.close()
    build_pool(
        synthetic(4, num_classes=2, channels=1, image_size=28), local_store.uri("holdout"), class_names=["a", "b"]
    )
    datasets, classes = labeled_training_data(local_store.uri("train"), local_store.uri("holdout"), "small_cnn")
    assert classes == ["a", "b"] and set(datasets) == {"train", "holdout"}
    rows = datasets["train"].take_all()
    assert len(rows) == 6 and set(rows[0]) == {"image", "label"}  # the corrupt sample is dropped
    assert rows[0]["image"].shape == (1, 28, 28) and sorted(r["label"] for r in rows) == [0, 0, 0, 1, 1, 1]
    assert datasets["holdout"].count() == 4
    with pytest.raises(ValueError, match=r"(?s)1 sample.*corrupt in .*pool-000000.tar: not a JPEG"):
        labeled_training_data(local_store.uri("train"), None, "small_cnn", errors="raise")
    build_pool(synthetic(2, num_classes=3), local_store.uri("other"))
    with pytest.raises(PoolError, match="class lists differ"):
        labeled_training_data(local_store.uri("train"), local_store.uri("other"), "small_cnn")
