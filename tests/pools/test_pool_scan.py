"""Bad input: duplicates across shards, split samples, truncated or non-tar shards."""

from __future__ import annotations

import pytest

from pipeline.pools import (
    DuplicateKeyError,
    ShardFormatError,
    build_pool,
    check_pool,
    iter_pool_samples,
    resolve_pool,
    synthetic,
)


def _sample(key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.cls", b"1"), (f"{key}.png", b"\x89PNG...")]


def test_duplicate_keys_across_shards_name_both_locations(make_tar, store) -> None:
    store.write("p/a.tar", make_tar(_sample("x") + _sample("y")))
    store.write("p/b.tar", make_tar(_sample("z") + _sample("y")))
    pool = resolve_pool(store.uri("p"), store.storage_options)
    with pytest.raises(DuplicateKeyError) as info:
        check_pool(pool)
    assert info.value.key == "y"
    assert (info.value.first, info.value.second) == (store.uri("p/a.tar"), store.uri("p/b.tar"))
    assert store.uri("p/a.tar") in str(info.value) and store.uri("p/b.tar") in str(info.value)
    with pytest.raises(DuplicateKeyError, match="b.tar"):
        list(iter_pool_samples(pool))


def test_files_of_a_sample_not_adjacent(make_tar, store) -> None:
    members = [("a.png", b"1"), ("b.png", b"2"), ("a.cls", b"3")]
    store.write("p/split.tar", make_tar(members))
    store.write("p/good.tar", make_tar(_sample("c")))
    pool = resolve_pool(store.uri("p"), store.storage_options)
    check = check_pool(pool)
    assert [s.uri for s in check.good] == [store.uri("p/good.tar")]
    ((shard, reason),) = check.problems
    assert shard == store.uri("p/split.tar") and "'a' are not adjacent" in reason and "--sort=name" in reason
    with pytest.raises(ShardFormatError, match="not adjacent"):
        list(iter_pool_samples(pool))


def _truncations(make_tar) -> dict[str, bytes]:
    full = make_tar(_sample("a") + [("b.png", b"x" * 3000)] + _sample("c"))
    return {
        "inside-a-member": full[: 512 * 4 + 512 + 1000],  # b.png header, then 1000 of its 3000 bytes
        "at-a-header": full[: 512 * 4],  # after sample a, exactly on a block boundary
        "mid-header": full[: 512 * 4 + 100],
    }


@pytest.mark.parametrize("cut", ["inside-a-member", "at-a-header", "mid-header"])
def test_truncated_tar_without_index(make_tar, store, cut: str) -> None:
    store.write("p/t.tar", _truncations(make_tar)[cut])
    pool = resolve_pool(store.uri("p"), store.storage_options)
    with pytest.raises(ShardFormatError, match="truncated") as info:
        list(iter_pool_samples(pool))
    assert info.value.shard == store.uri("p/t.tar")
    ((shard, reason),) = check_pool(pool, mode="full").problems
    assert "truncated" in reason
    assert check_pool(pool, mode="fast").problems  # no end-of-archive marker either


def test_truncated_shard_of_an_indexed_pool(store) -> None:
    index = build_pool(synthetic(6), store.uri("p"), shard_samples=3, storage_options=store.storage_options)
    shard = index.shards[1]
    store.write(f"p/{shard.name}", store.read(f"p/{shard.name}")[:-20_000])
    check = check_pool(resolve_pool(store.uri("p"), store.storage_options))
    assert check.mode == "fast" and [s.uri for s in check.good] == [store.uri("p/pool-000000.tar")]
    ((uri, reason),) = check.problems
    assert uri == store.uri("p/pool-000001.tar") and f"index says {shard.bytes}" in reason


def test_missing_shard_of_an_indexed_pool(store) -> None:
    build_pool(synthetic(6), store.uri("p"), shard_samples=3, storage_options=store.storage_options)
    store.fs.rm(store.path("p/pool-000000.tar"))
    ((uri, reason),) = check_pool(resolve_pool(store.uri("p"), store.storage_options)).problems
    assert uri == store.uri("p/pool-000000.tar") and reason == "shard does not exist"


def test_file_that_is_not_a_tar(local_store) -> None:
    local_store.write("p/junk.tar", b"this is not a tar archive at all" * 40)
    ((uri, reason),) = check_pool(resolve_pool(local_store.uri("p"))).problems
    assert uri.endswith("junk.tar") and "not a readable tar" in reason


def test_garbage_after_the_last_member(make_tar, local_store) -> None:
    data = make_tar(_sample("a"))
    local_store.write("p/g.tar", data[: 512 * 4] + b"\x01" * 512 + data[512 * 4 :])
    ((_, reason),) = check_pool(resolve_pool(local_store.uri("p")), mode="full").problems
    assert "corrupt tar" in reason
