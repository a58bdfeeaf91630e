"""Incremental runs without Ray: shard identities, the reuse decision, the rows it copies, and the
manifest fields it adds (runs committed with the library, as the query job commits them)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import s3fs

from pipeline.manifest import (
    ManifestError,
    PoolShard,
    QueryInputs,
    ScoreSummary,
    begin_run,
    commit_run,
    iter_scores,
    load_excluded,
)
from pipeline.manifest.incremental import (
    ReusePlan,
    iter_reused_rows,
    plan_reuse,
    shard_identities,
    shard_identity,
    shard_records,
)
from pipeline.manifest.verify import verify_run
from pipeline.storage import filesystem_for

SHARDS = ("pool/s-0.tar", "pool/s-1.tar", "pool/s-2.tar")
IDS = {uri: {"size": 100 + i, "etag": f"tag{i}"} for i, uri in enumerate(SHARDS)}


def _inputs(identities: dict[str, Any] | None = None, **changes: Any) -> QueryInputs:
    identities = IDS if identities is None else identities
    values: dict[str, Any] = dict(
        pool_uri="pool",
        shards=tuple(PoolShard(uri, 4, 100, identities.get(uri)) for uri in SHARDS),
        checkpoint_uri="ckpt",
        checkpoint_sha256="ab" * 32,
        strategy="lplgrad",
        k=2,
        strategy_params={"seed": 0, "norm": "per_tensor_sum"},
    )
    values.update(changes)
    return QueryInputs(**values)


def _commit(
    out: str,
    run_id: str,
    inputs: QueryInputs,
    *,
    excluded: Sequence[tuple[str, str]] = (),
    shard_errors: tuple[str, ...] = (),
    incremental: bool = True,
) -> dict[str, Any]:
    """A run whose scores hold keys `{shard}/k{0..3}` minus the excluded ones, score = index."""
    state = begin_run(out, run_id, inputs.fingerprint())
    skipped = {key for key, _ in excluded}
    with state.scores_writer() as writer:
        for s, shard in enumerate(SHARDS):
            keys = [f"{shard}/k{i}" for i in range(4) if f"{shard}/k{i}" not in skipped]
            writer.write(
                {
                    "key": keys,
                    "shard": [shard] * len(keys),
                    "score": np.arange(len(keys)) + 10.0 * s,
                    "error": pa.array([None] * len(keys), pa.string()),
                }
            )
    errors = [(None, shard, "shard unreadable: boom") for shard in shard_errors]
    extra = dict(excluded_rows=excluded, shards=shard_records(inputs, ReusePlan(), {}, {}), reuse=ReusePlan().to_dict())
    return commit_run(
        state,
        inputs,
        [],
        errors,
        scored=12 - len(skipped),
        excluded=len(skipped),
        summary=ScoreSummary(),
        **(extra if incremental else {}),
    )


def test_identity_prefers_etag_then_modification_time() -> None:
    assert shard_identity({"size": 5, "ETag": '"abc"', "LastModified": dt.datetime(2026, 1, 1)}) == {
        "size": 5,
        "etag": "abc",
    }
    assert shard_identity({"size": 5, "etag": "xyz", "updated": "2026"}) == {"size": 5, "etag": "xyz"}  # GCS
    assert shard_identity({"size": 5, "mtime": 12.5, "created": 1.0}) == {"size": 5, "mtime": 12.5}  # local disk
    stamp = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert shard_identity({"size": 5, "LastModified": stamp}) == {"size": 5, "mtime": stamp.timestamp()}
    assert shard_identity({"size": 5}) is None and shard_identity({"mtime": 1.0}) is None


def test_local_identity_changes_with_size_or_mtime(tmp_path) -> None:
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"x" * 10)
    fs, root = filesystem_for(str(tmp_path))
    paths = [f"{root}/a.tar", f"{root}/b.tar"]
    before = shard_identities(fs, paths)
    assert before[paths[0]]["size"] == 10 and "mtime" in before[paths[0]]
    os.utime(tmp_path / "a.tar", (1, 1))
    (tmp_path / "b.tar").write_bytes(b"y" * 11)
    after = shard_identities(fs, paths)
    assert after[paths[0]] == {"size": 10, "mtime": 1.0} and after[paths[1]]["size"] == 11


def test_s3_identity_is_the_etag_and_changes_with_content(s3_server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    prefix = s3_server.uri("pool").removeprefix("s3://")
    fs.pipe(f"{prefix}/a.tar", b"x" * 10)
    first = shard_identities(fs, [f"{prefix}/a.tar"])[f"{prefix}/a.tar"]
    fs.pipe(f"{prefix}/a.tar", b"y" * 10)  # same size, new content
    fs.invalidate_cache()
    second = shard_identities(fs, [f"{prefix}/a.tar"])[f"{prefix}/a.tar"]
    assert set(first) == {"size", "etag"} and first["size"] == second["size"] == 10 and first != second


def test_identity_is_part_of_the_fingerprint() -> None:
    changed = {**IDS, SHARDS[0]: {"size": 100, "etag": "other"}}
    assert _inputs().fingerprint() != _inputs(changed).fingerprint()
    assert _inputs().to_dict()["pool"]["shards"][0]["identity"] == IDS[SHARDS[0]]


def test_unchanged_shards_are_reused_and_excluded_keys_tracked(tmp_path) -> None:
    out = str(tmp_path / "q")
    _commit(out, "n1", _inputs(), excluded=[(f"{SHARDS[0]}/k0", SHARDS[0]), (f"{SHARDS[1]}/k1", SHARDS[1])])
    assert load_excluded(f"{out}/n1").column("key").to_pylist() == [f"{SHARDS[0]}/k0", f"{SHARDS[1]}/k1"]
    assert verify_run(f"{out}/n1").ok
    changed = {**IDS, SHARDS[2]: {"size": 102, "etag": "rewritten"}}
    # Tonight only s-0/k0 is still excluded: s-1/k1 has no row to copy and must be scored again.
    plan = plan_reuse(
        f"{out}/n1",
        _inputs(changed, strategy="entropy", strategy_params={"seed": 9, "norm": "per_tensor_sum"}),
        {f"{SHARDS[0]}/k0"},
    )
    assert plan.source_id == "n1" and set(plan.reused) == {SHARDS[0], SHARDS[1]}
    assert plan.reused[SHARDS[0]] == frozenset() and plan.reused[SHARDS[1]] == {f"{SHARDS[1]}/k1"}
    assert plan.still_excluded == ((f"{SHARDS[0]}/k0", SHARDS[0]),)
    assert plan.to_score(list(SHARDS)) == [SHARDS[1], SHARDS[2]]
    rows = [row for table in iter_reused_rows(plan) for row in table.to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(
        [f"{SHARDS[0]}/k{i}" for i in (1, 2, 3)] + [f"{SHARDS[1]}/k{i}" for i in (0, 2, 3)]
    )


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(checkpoint_sha256="cd" * 32), "checkpoint changed"),
        (dict(strategy_params={"seed": 0, "norm": "global"}), "norm changed"),
        (dict(subset_size=5), "random subset"),
    ],
)
def test_nothing_is_reused_when_the_scores_would_differ(tmp_path, change, reason) -> None:
    out = str(tmp_path / "q")
    _commit(out, "n1", _inputs())
    plan = plan_reuse(f"{out}/n1", _inputs(**change), set())
    assert plan.source is None and not plan.reused and reason in plan.reason
    assert plan.to_score(list(SHARDS)) == list(SHARDS)


def test_older_runs_shard_errors_and_unknown_identities_are_not_reused(tmp_path) -> None:
    out = str(tmp_path / "q")
    _commit(out, "n1", _inputs(), incremental=False)  # no shards record, no excluded.parquet
    assert "before incremental runs" in plan_reuse(f"{out}/n1", _inputs(), set()).reason
    _commit(out, "n2", _inputs({SHARDS[0]: IDS[SHARDS[0]], SHARDS[1]: IDS[SHARDS[1]]}), shard_errors=(SHARDS[1],))
    plan = plan_reuse(f"{out}/n2", _inputs(), set())
    assert set(plan.reused) == {SHARDS[0]}  # s-1 failed as a whole there; s-2 had no identity
    assert plan_reuse(None, _inputs(), set()).reused == {}


def test_scores_filter_by_shard_and_excluded_rows_must_add_up(tmp_path) -> None:
    out = str(tmp_path / "q")
    _commit(out, "n1", _inputs())
    shards = [s for batch in iter_scores(f"{out}/n1", shards=[SHARDS[2]]) for s in batch.column("shard").to_pylist()]
    assert shards == [SHARDS[2]] * 4
    state = begin_run(out, "n2", _inputs().fingerprint())
    with pytest.raises(ManifestError, match="excluded_rows holds 1 rows but excluded=2"):
        commit_run(state, _inputs(), [], [], scored=0, excluded=2, summary=ScoreSummary(), excluded_rows=[("a", "s")])
