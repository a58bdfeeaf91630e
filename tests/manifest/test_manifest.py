"""Selection manifest: commit protocol, readers and plain-pyarrow readability, on disk and on S3."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.acquisition import acquisition_values
from pipeline.acquisition.selection import TopK
from pipeline.manifest import (
    SCHEMA_VERSION,
    ManifestError,
    PoolShard,
    QueryInputs,
    RunConflictError,
    RunCounts,
    SchemaVersionError,
    ScoreSummary,
    UncommittedRunError,
    begin_run,
    commit_run,
    iter_scores,
    keys_digest,
    load,
    previous_run,
    previously_selected_keys,
    read_manifest,
    resolve_run,
    selection_rows,
)
from pipeline.manifest.verify import verify_run


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(output root URI, storage_options) on a local tmp dir or a fresh S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "queries"), {}
    server = request.getfixturevalue("s3_server")  # the session's loopback S3 (tests/conftest.py)
    return server.uri("queries"), dict(server.storage_options)


def _inputs(k: int = 3, **changes: Any) -> QueryInputs:
    values: dict[str, Any] = dict(
        pool_uri="s3://pools/cifar10",
        shards=(
            PoolShard("s3://pools/cifar10/pool-000000.tar", 6, 4096),
            PoolShard("s3://pools/cifar10/pool-000001.tar", 2, 2048),
        ),
        checkpoint_uri="s3://ckpt/epoch-10",
        checkpoint_sha256="ab" * 32,
        strategy="lplgrad",
        k=k,
        strategy_params={"seed": 0},
    )
    values.update(changes)
    return QueryInputs(**values)


def _score_batches(offset: int = 0) -> list[dict[str, np.ndarray]]:
    """Two RowScorer-like batches of 4 rows; row 'k-...-3' fails to score."""
    batches = []
    for b in range(2):
        keys = np.array([f"k-{offset + b}-{i}" for i in range(4)])
        gradnorm = np.array([1.0 + b, 5.0 - b, 0.5, np.nan])
        batches.append(
            {
                "key": keys,
                "shard": np.array([f"pool-00000{b}.tar"] * 4),
                "score": gradnorm,
                "entropy": gradnorm / 10,
                "margin": 1 - gradnorm / 10,
                "least_confidence": gradnorm / 20,
                "pred_class": np.array([0, 1, 2, -1]),
                "pred_prob": np.array([0.9, 0.5, 0.7, np.nan]),
                "predicted_loss": gradnorm * 2,
            }
        )
    return batches


def _run(out: str, options: dict[str, Any], run_id: str, inputs: QueryInputs, offset: int = 0) -> dict[str, Any]:
    """What the query job does: begin, score, write scores, top-k, commit."""
    state = begin_run(out, run_id, inputs.fingerprint(), options)
    assert not state.already_committed
    top, summary, scored, errors = TopK(inputs.k), ScoreSummary(), 0, []
    with state.scores_writer(rows_per_part=3) as writer:
        for batch in _score_batches(offset):
            values = acquisition_values(inputs.strategy, batch)
            writer.write({**batch, "acquisition": values})
            top.add(list(batch["key"]), values, selection_rows(batch, values))
            summary.add(values, batch["key"])
            scored += int(np.isfinite(values).sum())
            errors += [
                (k, s, "non-finite logits") for k, s, v in zip(batch["key"], batch["shard"], values) if np.isnan(v)
            ]
    return commit_run(state, inputs, top.result(), errors, scored=scored, excluded=0, summary=summary)


def test_commit_then_load_returns_the_selection(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    manifest = _run(out, options, "run-001", _inputs())
    table = load(f"{out}/run-001", options)
    assert table.column("key").to_pylist() == ["k-0-1", "k-1-1", "k-1-0"]  # gradnorm 5, 4, 2
    assert table.column("rank").to_pylist() == [1, 2, 3]
    assert table.column("score").to_pylist() == [5.0, 4.0, 2.0]
    assert table.column("gradnorm").to_pylist() == [5.0, 4.0, 2.0]
    assert table.column("shard").to_pylist() == ["pool-000000.tar", "pool-000001.tar", "pool-000001.tar"]
    frame = load(out, options, as_pandas=True)
    assert list(frame["key"]) == ["k-0-1", "k-1-1", "k-1-0"]
    assert manifest.counts == RunCounts(scored=6, excluded=0, errors=2, selected=3)
    assert read_manifest(out, options) == manifest
    assert manifest.claim == "exclusive"  # local disks and the loopback S3 server both take conditional creates
    assert sum(b.num_rows for b in iter_scores(out, options, columns=["key"])) == 8


def test_a_store_without_conditional_writes_commits_through_check_then_put_and_says_so() -> None:
    # fsspec's memory filesystem has no conditional create of its own (fsspec's generic
    # pipe_file(mode="create") looks, then writes): the fallback, recorded in the manifest.
    out = f"memory://queries-{uuid.uuid4().hex[:12]}"
    manifest = _run(out, {}, "run-001", _inputs())
    assert manifest.claim == "check-then-put"
    assert read_manifest(out) == manifest
    with fsspec.open(f"{out}/run-001/manifest.json", "rt") as handle:
        assert json.load(handle)["claim"] == "check-then-put"
    assert verify_run(out).ok


def test_uncommitted_run_is_refused(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    state = begin_run(out, "run-001", _inputs().fingerprint(), options)
    with state.scores_writer() as writer:  # the job dies after writing scores, before commit
        writer.write(_score_batches()[0])
    for reader in (load, read_manifest, resolve_run):
        with pytest.raises(UncommittedRunError, match="no manifest.json"):
            reader(f"{out}/run-001", options)
    with pytest.raises(UncommittedRunError):
        previously_selected_keys([f"{out}/run-001"], options)
    with pytest.raises(FileNotFoundError, match="no query run"):
        load(f"{out}/never-ran", options)


def test_same_inputs_again_is_a_no_op(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    inputs = _inputs()
    manifest = _run(out, options, "run-001", inputs)
    state = begin_run(out, "run-001", inputs.fingerprint(), options)
    assert state.already_committed and state.committed == manifest
    assert "already committed" in state.message and "nothing to do" in state.message
    with pytest.raises(ManifestError, match="already committed"):
        commit_run(state, inputs, [], [], scored=0, excluded=0, summary=ScoreSummary())
    assert read_manifest(f"{out}/run-001", options) == manifest


def test_different_inputs_never_overwrite(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    manifest = _run(out, options, "run-001", _inputs())
    with pytest.raises(RunConflictError, match="choose a new run id"):
        begin_run(out, "run-001", _inputs(k=2).fingerprint(), options)
    assert read_manifest(f"{out}/run-001", options) == manifest
    assert load(f"{out}/run-001", options).num_rows == 3


def test_crashed_attempt_is_never_part_of_the_run(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    inputs = _inputs()
    crashed = begin_run(out, "run-001", inputs.fingerprint(), options)
    with crashed.scores_writer(rows_per_part=2) as writer:  # 3 stale parts, then a crash
        for batch in _score_batches(offset=50):
            writer.write(batch)
    fs, _ = fsspec.core.url_to_fs(out, **options)
    state = begin_run(out, "run-001", inputs.fingerprint(), options)
    assert state.earlier_attempts == 1 and "1 uncommitted earlier attempt" in state.message
    assert state.attempt_id != crashed.attempt_id
    manifest = _run(out, options, "run-001", inputs)
    prefix = f"attempts/{manifest.attempt}/"
    assert manifest.files.scores == tuple(f"{prefix}scores/part-0000{i}.parquet" for i in range(3))
    assert set(manifest.checksums) == {
        *manifest.files.scores,
        f"{prefix}selection.parquet",
        f"{prefix}errors.parquet",
    }
    keys = [k for b in iter_scores(f"{out}/run-001", options, columns=["key"]) for k in b.column("key").to_pylist()]
    assert not any(k.startswith("k-50") for k in keys) and len(keys) == 8
    fs.invalidate_cache()
    assert fs.exists(f"{out}/run-001/attempts/{crashed.attempt_id}")  # left alone: it may still be running


def test_latest_moves_forward_and_is_followed(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    fs, _ = fsspec.core.url_to_fs(out, **options)
    _run(out, options, "run-002", _inputs(), offset=20)
    assert fs.cat_file(f"{out}/LATEST").decode() == "run-002"
    _run(out, options, "run-001", _inputs(), offset=10)  # an older-sorting id: LATEST stays
    fs.invalidate_cache()
    assert fs.cat_file(f"{out}/LATEST").decode() == "run-002"
    assert load(out, options).column("key").to_pylist()[0] == "k-20-1"
    _run(out, options, "run-003", _inputs(), offset=30)
    assert load(out, options).column("key").to_pylist()[0] == "k-30-1"
    assert resolve_run(out, options).endswith("/run-003")
    assert previously_selected_keys([f"{out}/run-001", out], options) == {
        "k-10-1",
        "k-11-1",
        "k-11-0",
        "k-30-1",
        "k-31-1",
        "k-31-0",
    }


def test_files_stand_alone_with_plain_pyarrow_and_json(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    _run(out, options, "run-001", _inputs())
    run = f"{out}/run-001"
    # No project code below: fsspec, pyarrow, json, hashlib only.
    with fsspec.open(f"{run}/manifest.json", "rt", **options) as handle:
        manifest = json.load(handle)
    assert manifest["schema_version"] == 1
    assert manifest["inputs"]["strategy"] == {"name": "lplgrad", "params": {"seed": 0}}
    assert manifest["inputs"]["pool"]["shards"][0] == {
        "uri": "s3://pools/cifar10/pool-000000.tar",
        "samples": 6,
        "bytes": 4096,
    }
    assert manifest["checkpoint"] == {"uri": "s3://ckpt/epoch-10", "sha256": "ab" * 32}
    canonical = json.dumps(manifest["inputs"], sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() == manifest["inputs_fingerprint"]
    assert manifest["started_at"].endswith("Z") and manifest["finished_at"] >= manifest["started_at"]
    assert set(manifest["software"]) >= {"python", "torch", "ray", "pyarrow", "lplgrad"}
    assert manifest["claim"] == "exclusive"
    summary = manifest["score_summary"]
    assert (summary["count"], summary["min"], summary["max"], summary["quantiles"]["0.5"]) == (6, 0.5, 5.0, 1.5)
    with fsspec.open(f"{run}/{manifest['files']['selection']}", "rb", **options) as handle:
        selection = pq.read_table(handle)
    assert selection.schema.field("rank").type == pa.int32()
    assert selection.schema.field("key").type == pa.string()
    assert selection.column_names[:5] == ["rank", "key", "shard", "score", "selection_value"]
    assert selection.to_pandas()["key"].tolist() == ["k-0-1", "k-1-1", "k-1-0"]
    with fsspec.open(f"{run}/{manifest['files']['errors']}", "rb", **options) as handle:
        errors = pq.read_table(handle).to_pylist()
    assert errors == [
        {"key": "k-0-3", "shard": "pool-000000.tar", "reason": "non-finite logits"},
        {"key": "k-1-3", "shard": "pool-000001.tar", "reason": "non-finite logits"},
    ]
    rows = 0
    for part in manifest["files"]["scores"]:
        with fsspec.open(f"{run}/{part}", "rb", **options) as handle:
            rows += pq.read_table(handle).num_rows
    assert rows == 8


def test_newer_schema_version_is_refused(tmp_path: Any) -> None:
    out = str(tmp_path)
    _run(out, {}, "run-001", _inputs())
    path = tmp_path / "run-001" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SchemaVersionError, match="upgrade lplgrad"):
        load(out)


def test_scores_writer_bounds_parts_and_checks_schema(tmp_path: Any) -> None:
    state = begin_run(str(tmp_path), "run-001", "f" * 64)
    writer = state.scores_writer(rows_per_part=4)
    for start in range(0, 10, 3):
        n = min(3, 10 - start)
        writer.write(pa.table({"key": [f"k{start + i}" for i in range(n)], "v": np.arange(n, dtype=np.float32)}))
    with pytest.raises(ValueError, match="does not match"):
        writer.write(pa.table({"other": [1]}))
    parts = writer.close()
    assert [pq.read_metadata(p).num_rows for p in parts] == [4, 4, 2]
    keys = [k for b in writer.iter_batches(["key"]) for k in b.column("key").to_pylist()]
    assert keys == [f"k{i}" for i in range(10)]


def test_fingerprint_covers_what_defines_the_result() -> None:
    base = _inputs()
    assert base.fingerprint() == _inputs().fingerprint()
    assert base.fingerprint() == _inputs(checkpoint_uri="/tmp/copy").fingerprint()  # same weights elsewhere
    for change in (
        {"k": 4},
        {"checkpoint_sha256": "cd" * 32},
        {"strategy_params": {"seed": 1}},
        {"subset_size": 5},
        {"excluded_keys_sha256": keys_digest(["a"])},
        {"shards": base.shards[:1]},
    ):
        assert _inputs(**change).fingerprint() != base.fingerprint(), change
    assert keys_digest(["b", "a", "a"]) == keys_digest(["a", "b"])
    with pytest.raises(ValueError, match="canonical JSON"):
        _inputs(strategy_params={"beta": float("nan")}).fingerprint()


def test_bad_run_id_is_refused(tmp_path: Any) -> None:
    for run_id in ("", "LATEST", "../x", "a/b", "-x"):
        with pytest.raises(ValueError, match="run id"):
            begin_run(str(tmp_path), run_id, "f" * 64)


def test_score_summary_is_order_free_and_mergeable() -> None:
    rng = np.random.default_rng(0)
    keys = [f"s{i}" for i in range(5000)]
    values = rng.normal(size=5000)
    values[::97] = np.nan
    whole = ScoreSummary(capacity=512)
    whole.add(values, keys)
    merged = ScoreSummary(capacity=512)
    for idx in np.array_split(rng.permutation(5000), 6):
        part = ScoreSummary(capacity=512)
        part.add(values[idx], [keys[i] for i in idx])
        merged.merge(part)
    a, b = whole.to_dict(), merged.to_dict()
    assert a["quantiles"] == b["quantiles"] and a["count"] == b["count"] == int(np.isfinite(values).sum())
    finite = values[np.isfinite(values)]
    assert a["mean"] == pytest.approx(finite.mean()) and b["std"] == pytest.approx(finite.std())
    assert a["min"] == finite.min() and a["non_finite"] == 52
    assert a["quantiles"]["0.5"] == pytest.approx(np.median(finite), abs=0.15)  # a 512-row sample
    assert a["quantile_method"].startswith("key-hash bottom-k")


def test_previous_run_names_the_newest_committed_run_before_an_id(store: tuple[str, dict[str, Any]]) -> None:
    out, options = store
    assert previous_run(out, "2026-11-21", options) is None  # first night: nothing yet
    _run(out, options, "2026-11-19", _inputs(), offset=10)
    _run(out, options, "2026-11-20", _inputs(), offset=20)
    begin_run(out, "2026-11-20b", _inputs().fingerprint(), options).scores_writer().write(
        _score_batches()[0]
    )  # uncommitted
    assert previous_run(out, "2026-11-21", options).endswith("/2026-11-20b") is False
    assert previous_run(out, "2026-11-21", options).endswith("/2026-11-20")
    # Re-running a committed night names the night before it, not itself (LATEST would).
    assert previous_run(out, "2026-11-20", options).endswith("/2026-11-19")
