"""Finding shards: index, listing, brace patterns, globs; pools made by other tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import webdataset

from pipeline.pools import (
    EmptyPoolError,
    PoolNotFoundError,
    build_pool,
    check_pool,
    encode_image,
    iter_pool_samples,
    resolve_pool,
    synthetic,
)


def _keys(uri: str, store) -> list[str]:
    return [s.key for s in iter_pool_samples(resolve_pool(uri, store.storage_options))]


def test_index_listing_pattern_glob_and_single_shard_agree(store) -> None:
    build_pool(synthetic(10), store.uri("p"), shard_samples=4, storage_options=store.storage_options)
    expected = [f"synthetic_train_{i:06d}" for i in range(10)]
    indexed = resolve_pool(store.uri("p"), store.storage_options)
    assert indexed.how == "index" and indexed.num_samples == 10 and len(indexed.classes) == 10
    assert [s.uri for s in indexed.shards] == [store.uri(f"p/pool-00000{i}.tar") for i in range(3)]
    assert resolve_pool(store.uri("p/index.json"), store.storage_options).how == "index"

    store.fs.rm(store.path("p/index.json"))
    listed = resolve_pool(store.uri("p"), store.storage_options)
    assert listed.how == "listing" and listed.index is None
    assert [s.uri for s in listed.shards] == [s.uri for s in indexed.shards]
    for uri, how in (
        (store.uri("p"), "listing"),
        (store.uri("p/pool-{000000..000002}.tar"), "pattern"),
        (store.uri("p/pool-*.tar"), "glob"),
    ):
        pool = resolve_pool(uri, store.storage_options)
        assert pool.how == how
        assert _keys(uri, store) == expected
    assert _keys(store.uri("p/pool-000001.tar"), store) == expected[4:8]


def test_missing_prefix_is_a_clear_error(store) -> None:
    with pytest.raises(PoolNotFoundError, match="prefix does not exist"):
        resolve_pool(store.uri("nothing-here"), store.storage_options)
    with pytest.raises(PoolNotFoundError, match="does not exist"):
        resolve_pool(store.uri("nothing-here/index.json"), store.storage_options)


def test_prefix_without_shards_is_an_empty_pool(store) -> None:
    store.write("p/notes.txt", b"no shards here")
    with pytest.raises(EmptyPoolError, match="no .tar shards"):
        resolve_pool(store.uri("p"), store.storage_options)


def test_pool_of_empty_tars_is_empty(make_tar, store) -> None:
    store.write("p/pool-000000.tar", make_tar([]))
    with pytest.raises(EmptyPoolError, match="hold no samples"):
        check_pool(resolve_pool(store.uri("p"), store.storage_options))


def test_brace_pattern_names_missing_shards(store) -> None:
    build_pool(synthetic(4), store.uri("p"), shard_samples=2, storage_options=store.storage_options)
    with pytest.raises(PoolNotFoundError, match="pool-000002.tar"):
        resolve_pool(store.uri("p/pool-{000000..000002}.tar"), store.storage_options)


def _png() -> bytes:
    return encode_image(next(iter(synthetic(1))).image)


def test_shardwriter_pool_is_found_by_listing_and_pattern(store, tmp_path: Path) -> None:
    local = tmp_path / "wds"
    local.mkdir()
    with webdataset.ShardWriter(str(local / "shard-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(7):
            sink.write({"__key__": f"s{i:03d}", "png": _png(), "cls": i % 3, "json": {"i": i}})
    for path in sorted(local.iterdir()):
        store.write(f"wds/{path.name}", path.read_bytes())
    for uri in (store.uri("wds"), store.uri("wds/shard-{000000..000002}.tar")):
        pool = resolve_pool(uri, store.storage_options)
        check = check_pool(pool)
        assert check.mode == "full" and check.num_samples == 7 and not check.problems
        samples = list(iter_pool_samples(pool))
        assert [s.key for s in samples] == [f"s{i:03d}" for i in range(7)]
        assert samples[4].files["cls"] == b"1" and set(samples[4].files) == {"cls", "json", "png"}


def test_python_tarfile_pool_without_index(make_tar, store) -> None:
    members = [(f"k{i}.{ext}", data) for i in range(3) for ext, data in (("cls", b"2"), ("png", _png()))]
    store.write("t/a.tar", make_tar(members))
    pool = resolve_pool(store.uri("t"), store.storage_options)
    assert pool.how == "listing" and check_pool(pool).num_samples == 3


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_pool_found_by_pattern(store, tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    for i in range(4):
        (files / "sub" / f"x{i}.png").write_bytes(_png())
        (files / "sub" / f"x{i}.cls").write_text(str(i))
    for part, names in (("000", ["x0", "x1"]), ("001", ["x2", "x3"])):
        members = [f"sub/{n}.{ext}" for n in names for ext in ("cls", "png")]
        out = tmp_path / f"gnu-{part}.tar"
        subprocess.run(["tar", "--sort=name", "-cf", str(out), "-C", str(files), *members], check=True)
        store.write(f"gnu/gnu-{part}.tar", out.read_bytes())
    pool = resolve_pool(store.uri("gnu/gnu-{000..001}.tar"), store.storage_options)
    assert pool.how == "pattern"
    check = check_pool(pool)
    assert check.num_samples == 4 and not check.problems
    assert [s.key for s in iter_pool_samples(pool)] == ["sub/x0", "sub/x1", "sub/x2", "sub/x3"]
