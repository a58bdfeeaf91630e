"""Labeling: pool + key,label table -> labeled pool; appending; every bad row is an error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.pools import (
    LabelError,
    PoolExistsError,
    build_pool,
    iter_pool_samples,
    label_pool,
    read_labels_table,
    resolve_pool,
    synthetic,
)

CLASSES = ("cat", "dog", "bird")


def _unlabeled_pool(store, name: str = "pool", n: int = 8) -> str:
    uri = store.uri(name)
    build_pool(
        synthetic(n, num_classes=3),
        uri,
        shard_samples=3,
        storage_options=store.storage_options,
        class_names=CLASSES,
        unlabeled=True,
    )
    return uri


def _key(i: int) -> str:
    return f"synthetic_train_{i:06d}"


def _labels_of(uri: str, store) -> dict[str, int]:
    return {s.key: int(s.files["cls"]) for s in iter_pool_samples(resolve_pool(uri, store.storage_options))}


def test_csv_labels_make_a_labeled_pool(store) -> None:
    pool = _unlabeled_pool(store)
    assert not resolve_pool(pool, store.storage_options).index.labeled
    table = store.write("answers.csv", f"key,label\n{_key(5)},dog\n{_key(1)},2\n{_key(6)},0\n".encode())
    report = label_pool(pool, table, store.uri("labeled"), storage_options=store.storage_options, shard_samples=2)
    assert report.added == 3 and report.carried == 0
    labeled = resolve_pool(store.uri("labeled"), store.storage_options)
    assert labeled.index.labeled and labeled.classes == CLASSES and labeled.num_samples == 3
    assert _labels_of(store.uri("labeled"), store) == {_key(1): 2, _key(5): 1, _key(6): 0}  # pool order
    # The image bytes are the pool's, untouched.
    original = {s.key: s.files["png"] for s in iter_pool_samples(resolve_pool(pool, store.storage_options))}
    for sample in iter_pool_samples(labeled):
        assert sample.files["png"] == original[sample.key]


def test_parquet_table_and_appending_to_a_labeled_set(store, tmp_path) -> None:
    pool = _unlabeled_pool(store)
    label_pool(pool, {_key(0): "cat", _key(3): "bird"}, store.uri("round0"), storage_options=store.storage_options)
    pq.write_table(pa.table({"key": [_key(3), _key(7)], "label": ["bird", "dog"]}), tmp_path / "round1.parquet")
    store.write("round1.parquet", (tmp_path / "round1.parquet").read_bytes())
    report = label_pool(
        pool,
        store.uri("round1.parquet"),
        store.uri("round1"),
        append_to=store.uri("round0"),
        storage_options=store.storage_options,
    )
    assert (report.carried, report.added, report.already_labeled) == (2, 1, 1)
    samples = list(iter_pool_samples(resolve_pool(store.uri("round1"), store.storage_options)))
    assert [s.key for s in samples] == [_key(0), _key(3), _key(7)]  # previous set first
    assert [int(s.files["cls"]) for s in samples] == [0, 2, 1]
    assert _labels_of(store.uri("round0"), store) == {_key(0): 0, _key(3): 2}  # previous set unchanged


def test_unknown_keys_are_an_error_and_nothing_is_written(store) -> None:
    pool = _unlabeled_pool(store)
    with pytest.raises(LabelError, match="1 labeled key.*'not_in_pool'"):
        label_pool(pool, {_key(1): 0, "not_in_pool": 1}, store.uri("out"), storage_options=store.storage_options)
    assert not store.exists("out/index.json") and not store.exists("out/pool-000000.tar")


@pytest.mark.parametrize("label", ["3", "-1", "fish"])
def test_label_outside_the_class_list(local_store, label: str) -> None:
    pool = _unlabeled_pool(local_store)
    with pytest.raises(LabelError, match=f"label '{label}' for key .* outside the class list"):
        label_pool(pool, {_key(0): label}, local_store.uri("out"))


def test_conflicting_relabel_of_an_existing_set(local_store) -> None:
    pool = _unlabeled_pool(local_store)
    label_pool(pool, {_key(2): 0}, local_store.uri("round0"))
    with pytest.raises(LabelError, match="labeled 0 in .* but 1 in the labels table"):
        label_pool(pool, {_key(2): 1}, local_store.uri("round1"), append_to=local_store.uri("round0"))
    assert not local_store.exists("round1/pool-000000.tar")


def test_append_to_must_be_labeled_and_classes_must_agree(local_store) -> None:
    pool = _unlabeled_pool(local_store)
    with pytest.raises(LabelError, match="not a labeled set"):
        label_pool(pool, {_key(1): 0}, local_store.uri("out"), append_to=pool)
    with pytest.raises(LabelError, match="class lists differ"):
        label_pool(pool, {_key(1): 0}, local_store.uri("out"), classes=["a", "b", "c"])


def test_pool_without_class_list_needs_classes(local_store, make_tar) -> None:
    local_store.write("foreign/a.tar", make_tar([("k1.png", b"x"), ("k2.png", b"y")]))
    with pytest.raises(LabelError, match="no class list"):
        label_pool(local_store.uri("foreign"), {"k1": 0}, local_store.uri("out"))
    report = label_pool(local_store.uri("foreign"), {"k2": "b"}, local_store.uri("out"), classes=["a", "b"])
    assert report.added == 1 and _labels_of(local_store.uri("out"), local_store) == {"k2": 1}


def test_output_must_be_a_new_prefix(local_store) -> None:
    pool = _unlabeled_pool(local_store)
    with pytest.raises(PoolExistsError):
        label_pool(pool, {_key(1): 0}, pool)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"name,label\nx,1\n", "lacks column"),
        (b"key,label\nx,1\nx,2\n", "two labels"),
        (b"key,label\nx,\n", "empty key or label"),
    ],
)
def test_bad_tables(local_store, text: bytes, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        read_labels_table(local_store.write("t.csv", text))


def test_table_keeps_keys_as_text(local_store) -> None:
    assert read_labels_table(local_store.write("t.csv", b"key,label\n007,1\n")) == {"007": "1"}
