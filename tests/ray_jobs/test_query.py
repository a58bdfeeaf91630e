"""The query job end to end on a local Ray: a pool written by another tool (plain tar, no index)
with one corrupt sample, a labeled subset built with the pools layer, a checkpoint from the real
training job, then querying: exact selection, exclusions, no-op re-runs, an actor killed mid-run,
S3 output read back with plain pyarrow, and the refusals that come before any scoring."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from _tar_shards import write_png_shard

from pipeline import manifest
from pipeline.acquisition import CandidateGatherer, CandidateMemoryError, SelectionSpec, select_candidates
from pipeline.acquisition.selection import select_topk
from pipeline.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from pipeline.config import ConfigError
from pipeline.manifest.verify import verify_run
from pipeline.pools import decode_sample, encode_image, label_pool, spec_for_model, synthetic
from pipeline.scoring import RowScorer, gradnorm_scores
from ray_jobs import query as query_job
from ray_jobs import train
from ray_jobs._shared.progress import PROGRESS_INTERVAL_ENV
from ray_jobs._shared.querying import FAULT_DRILL_ENV, QuerySpec, fault_drill, query

CLASSES = [str(c) for c in range(4)]


def write_tar_pool(directory, samples: list, per_shard: int = 50) -> None:
    """Shards as another tool would write them: GNU-tar layout, no index, no class list."""
    directory.mkdir(parents=True)
    for start in range(0, len(samples), per_shard):
        write_png_shard(directory / f"shard-{start // per_shard:04d}.tar", samples[start : start + per_shard])


@pytest.fixture(scope="module")
def cycle(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("cycle")
    source = list(synthetic(230, seed=3, num_classes=4, image_size=28, channels=1))
    samples = [(s.key, encode_image(s.image, "png")) for s in source]
    samples.insert(117, ("corrupt-0001", b"this is not a png"))
    write_tar_pool(root / "pool", samples)
    truth = {s.key: s.label for s in source}
    labeled = {s.key: s.label for s in source[:96]}
    label_pool(str(root / "pool"), labeled, str(root / "labeled"), classes=CLASSES)
    config = train.TrainConfig(
        labeled=str(root / "labeled"),
        model="small_cnn",
        # One worker, one epoch: these tests need a checkpoint from the training job, not a trained
        # model (every check compares the job with the library on the same checkpoint); test_train
        # covers two workers.
        epochs=1,
        batch_size=32,
        num_workers=1,
        storage_path=str(root / "train"),
        name="cycle",
    )
    checkpoint = train.run(config).checkpoint
    return {
        "root": root,
        "pool": str(root / "pool"),
        "labeled": str(root / "labeled"),
        "checkpoint": checkpoint,
        "samples": dict(samples),
        "truth": truth,
        "labeled_keys": set(labeled),
    }


def library_scores(cycle, keys: list[str]) -> np.ndarray:
    """Scores computed by the library directly, without Ray: decode, rebuild, score."""
    model, _, _ = build_from_checkpoint(load_checkpoint(cycle["checkpoint"]))
    spec = spec_for_model("small_cnn", num_classes=4)
    images = np.stack([decode_sample({"png": cycle["samples"][k]}, spec).image for k in keys])
    return gradnorm_scores(model, torch.from_numpy(images)).numpy()


def query_config(cycle, **overrides) -> QuerySpec:
    values = dict(
        pool=cycle["pool"],
        checkpoint=cycle["checkpoint"],
        strategy="lplgrad",  # these tests check the exact gradient-norm path; the default is margin
        k=12,
        out=str(cycle["root"] / "queries"),
        batch_size=32,
        actors=2,
        cpus_per_actor=0.5,
    )
    values.update(overrides)
    return QuerySpec(**values)


@pytest.fixture(scope="module")
def first_run(cycle) -> tuple[dict, str]:
    """Run r1 under `queries`, the reference other tests compare with, whichever test runs first;
    with what LATEST said right after (a later run under `queries` moves it)."""
    written = query(query_config(cycle, run_id="r1"))
    return written, (cycle["root"] / "queries" / "LATEST").read_text().strip()


def run_scores(run) -> pa.Table:
    """A committed run's whole scores table (its parts live under the committed attempt)."""
    return pa.Table.from_batches(list(manifest.iter_scores(str(run))))


def test_selection_is_the_exact_topk_of_library_scores(cycle, first_run) -> None:
    written, latest = first_run
    run_dir = cycle["root"] / "queries" / "r1"
    scores = run_scores(run_dir).to_pydict()
    keys = scores["key"]
    assert len(keys) == len(set(keys)) == 231  # every sample exactly once, the corrupt one included
    good = [k for k, e in zip(keys, scores["error"]) if e is None]
    expected = library_scores(cycle, good)
    by_key = dict(zip(keys, scores["score"]))
    assert np.allclose([by_key[k] for k in good], expected, rtol=1e-4)
    selection = manifest.load(str(run_dir))
    assert selection.column("key").to_pylist() == select_topk(good, expected, 12)
    assert selection.column("rank").to_pylist() == list(range(1, 13))
    errors = manifest.load_errors(str(run_dir)).to_pydict()
    assert errors["key"] == ["corrupt-0001"] and errors["reason"][0]
    counts = json.loads((run_dir / "manifest.json").read_text())["counts"]
    assert counts == {"scored": 230, "excluded": 0, "errors": 1, "selected": 12}
    assert written.checkpoint["sha256"] and latest == "r1"


def test_rerun_is_a_noop_and_exclusions_are_honoured(cycle, first_run, capsys) -> None:
    first = manifest.read_manifest(str(cycle["root"] / "queries" / "r1"))
    assert query(query_config(cycle, run_id="r1")) == first
    assert "nothing to do" in capsys.readouterr().out
    query(
        query_config(
            cycle,
            run_id="r2",
            exclude_labeled=cycle["labeled"],
            exclude_manifests=(str(cycle["root"] / "queries" / "r1"),),
        )
    )
    second = manifest.load(str(cycle["root"] / "queries" / "r2")).column("key").to_pylist()
    first_keys = set(manifest.load(str(cycle["root"] / "queries" / "r1")).column("key").to_pylist())
    assert len(second) == 12 and not (set(second) & (first_keys | cycle["labeled_keys"]))
    counts = manifest.read_manifest(str(cycle["root"] / "queries" / "r2")).counts
    assert counts.excluded == len(first_keys | cycle["labeled_keys"])


def test_a_scoring_actor_killed_mid_run_still_gives_a_complete_manifest(cycle, first_run, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_DRILL_ENV, "2")  # the first actor to reach 2 batches exits hard, once
    query(query_config(cycle, run_id="r3", out=str(cycle["root"] / "drill")))
    assert (cycle["root"] / "drill" / ".actor-failure-drill").exists()  # the actor really died
    keys = run_scores(cycle["root"] / "drill" / "r3").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 231
    reference = manifest.load(str(cycle["root"] / "queries" / "r1")).column("key").to_pylist()
    assert manifest.load(str(cycle["root"] / "drill" / "r3")).column("key").to_pylist() == reference


def test_pool_and_manifest_on_s3_read_back_with_plain_pyarrow(cycle, first_run, s3_server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    pool = s3_server.uri("pool")
    fs.put(cycle["pool"] + "/", pool.removeprefix("s3://") + "/", recursive=True)
    out = s3_server.uri("queries")
    query(query_config(cycle, pool=pool, out=out, run_id="s3run", storage_options=s3_server.storage_options))
    via_library = manifest.load(out, storage_options=s3_server.storage_options)  # follows LATEST
    selection = manifest.read_manifest(out, storage_options=s3_server.storage_options).files.selection
    with fs.open(out.removeprefix("s3://") + f"/s3run/{selection}", "rb") as handle:
        plain = pq.read_table(handle)
    assert via_library.column("key").to_pylist() == plain.column("key").to_pylist()
    local = manifest.load(str(cycle["root"] / "queries" / "r1")).column("key").to_pylist()
    assert plain.column("key").to_pylist() == local


def test_bad_input_is_refused_before_scoring(cycle, tmp_path) -> None:
    with pytest.raises(ConfigError, match="k must be positive"):
        query_job.JOB.parse_args([f"pool={cycle['pool']}", f"checkpoint={cycle['checkpoint']}", "k=0"])
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        query(query_config(cycle, checkpoint=str(tmp_path), run_id="bad1"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not writable"):
        query(query_config(cycle, out=str(blocker / "out"), run_id="bad2"))
    assert not (cycle["root"] / "queries" / "bad1").exists()


def test_k_larger_than_the_pool_selects_everything_scoreable(cycle, capsys) -> None:
    query(query_config(cycle, k=1000, run_id="all", out=str(tmp_out := cycle["root"] / "all")))
    assert manifest.load(str(tmp_out / "all")).num_rows == 230
    assert "larger than the 230 scoreable samples" in capsys.readouterr().out


def test_random_subset_and_stochastic_acquisition_are_reproducible(cycle) -> None:
    out = cycle["root"] / "stochastic"
    first = query(query_config(cycle, run_id="a", out=str(out), subset=100, stochastic="softmax", beta=5.0, seed=7))
    again = query(
        query_config(cycle, run_id="b", out=str(out), subset=100, stochastic="softmax", beta=5.0, seed=7, actors=1)
    )
    query(query_config(cycle, run_id="c", out=str(out), subset=100, stochastic="softmax", beta=5.0, seed=8))
    assert 60 < first.counts.scored + first.counts.errors < 140  # about `subset` of 231 rows
    keys = {run: manifest.load(str(out / run)).column("key").to_pylist() for run in "abc"}
    assert keys["a"] == keys["b"] and keys["a"] != keys["c"]
    scored = set(run_scores(out / "a").column("key").to_pylist())
    assert set(keys["a"]) <= scored
    assert again.counts == first.counts


def summary_figures(line: str) -> dict[str, float]:
    """The counts and the rate of the query's summary line."""
    pattern = r"scored (\d+) rows \((\d+) here at ([\d.]+) rows/s .*selected (\d+), errors (\d+) .*excluded (\d+);"
    found = re.search(pattern, line)
    assert found, line
    names = ("scored", "fresh", "rate", "selected", "errors", "excluded")
    return {name: float(value) for name, value in zip(names, found.groups())}


def test_a_pool_whose_every_shard_is_unreadable_commits_an_empty_selection(
    cycle, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "0.3")  # progress lines while the actors start
    pool = tmp_path / "bad-pool"
    pool.mkdir()
    (pool / "shard-0000.tar").write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes
    good = (cycle["root"] / "pool" / "shard-0000.tar").read_bytes()
    (pool / "shard-0001.tar").write_bytes(good[: len(good) // 3 + 100])  # truncated mid-member
    out = tmp_path / "queries"
    written = query(query_config(cycle, pool=str(pool), out=str(out), run_id="bad", incremental=False))
    assert written.counts.selected == 0 and written.counts.scored == 0
    errors = manifest.load_errors(str(out / "bad")).to_pylist()
    by_shard = {e["shard"]: e["reason"] for e in errors if e["key"] is None}
    assert set(by_shard) == {str(pool / "shard-0000.tar"), str(pool / "shard-0001.tar")}, errors
    assert all(reason for reason in by_shard.values())
    assert verify_run(str(out / "bad")).ok
    lines = capsys.readouterr().out.splitlines()
    summary = [line for line in lines if line.startswith("scored ")]
    assert len(summary) == 1 and "selected 0" in summary[0] and "unreadable shards 2" in summary[0], summary
    # The summary says what the manifest says: error rows are not scored rows.
    figures = summary_figures(summary[0])
    counts = written.counts
    assert (figures["scored"], figures["selected"], figures["errors"], figures["excluded"]) == (
        counts.scored,
        counts.selected,
        counts.errors,
        counts.excluded,
    )
    assert figures["fresh"] == 0 and figures["rate"] == round(written.extra["samples_per_s"], 1) == 0.0
    # Progress lines from the start, and more than the stage's own while the first batch is awaited.
    progress = [line for line in lines if line.startswith("query: ")]
    assert progress and "preparing" in progress[0], lines
    first_scored = next(i for i, line in enumerate(progress) if "scoring" in line)
    assert sum("starting actors" in line for line in progress[:first_scored]) >= 2, progress


def test_a_label_outside_the_class_range_in_a_pool_without_index_is_scored(cycle, tmp_path) -> None:
    pool = tmp_path / "stray-labels"
    pool.mkdir()
    keys = list(cycle["samples"])[:6]
    with tarfile.open(pool / "shard-0000.tar", "w") as tar:
        for i, key in enumerate(keys):
            for suffix, payload in ((".png", cycle["samples"][key]), (".cls", b"9" if i == 0 else b"1")):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    written = query(
        query_config(cycle, pool=str(pool), out=str(tmp_path / "q"), run_id="stray", k=3, incremental=False)
    )
    assert written.counts.errors == 0 and written.counts.scored == 6  # cls 9 of 4 classes: still scored


def test_a_query_killed_during_its_commit_is_no_result_and_a_rerun_commits(cycle, tmp_path) -> None:
    import os
    import subprocess
    import sys

    import ray

    out = tmp_path / "drill"
    argv = [
        sys.executable,
        "-m",
        "ray_jobs.query",
        f"pool={cycle['pool']}",
        f"checkpoint={cycle['checkpoint']}",
        f"out={out}",
        "run_id=n1",
        "k=12",
        "batch_size=32",
        "actors=1",
        "cpus_per_actor=0.5",
        "incremental=false",
    ]
    env = {
        **os.environ,
        "LPLGRAD_FAULT_AT_COMMIT_STEP": "manifest",  # killed just before manifest.json
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }  # the job joins this session's Ray
    killed = subprocess.run(
        argv, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert "no manifest.json" in verify_run(str(out / "n1")).problems[0]
    with pytest.raises(manifest.UncommittedRunError):
        manifest.load(str(out / "n1"))
    written = query(query_config(cycle, out=str(out), run_id="n1", incremental=False))
    assert verify_run(str(out / "n1")).ok and written.counts.scored == 230
    assert len(list((out / "n1" / "attempts").iterdir())) == 2  # the killed attempt's files are left, never read


def test_the_driver_guard_covers_every_uri_the_checks_read(monkeypatch) -> None:
    guarded = []
    monkeypatch.setattr(query_job, "check_before_ray", lambda spec: None)
    monkeypatch.setattr(query_job, "connect", lambda address: "joined")
    monkeypatch.setattr(query_job, "guard_driver", lambda named, options: guarded.extend(named))
    monkeypatch.setattr(query_job, "check_capacity", lambda demands: None)
    scored_one = SimpleNamespace(counts=SimpleNamespace(scored=1, errors=0))  # what start reads of the manifest
    monkeypatch.setattr(query_job, "query", lambda spec, checked: scored_one)
    spec = QuerySpec(pool="s3://b/pool", checkpoint="s3://b/ckpt", out="s3://b/q", exclude_manifests=("s3://b/q/r1",))
    query_job.start(spec)
    assert guarded == [("pool", "s3://b/pool"), ("checkpoint", "s3://b/ckpt"), ("out", "s3://b/q")] + [
        ("exclude_manifests", "s3://b/q/r1")
    ]


def test_the_fault_drill_is_off_by_default_and_refuses_a_remote_out(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(FAULT_DRILL_ENV, raising=False)
    assert fault_drill(str(tmp_path)) == {}
    monkeypatch.setenv(FAULT_DRILL_ENV, "3")
    assert fault_drill(str(tmp_path)) == {"fail_after": 3, "marker": str(tmp_path / ".actor-failure-drill")}
    with pytest.raises(ValueError, match="needs a local out"):
        fault_drill("s3://bucket/queries")


@pytest.mark.parametrize("strategy", ["badge", "cluster-margin"])
def test_diverse_selection_equals_the_in_memory_one_on_the_same_embeddings(cycle, strategy, capsys) -> None:
    out = cycle["root"] / f"diverse-{strategy}"
    # M = 120 of the 230 scoreable rows: the gathering across actors and batches is exercised too.
    written = query(query_config(cycle, strategy=strategy, k=20, candidates=120, run_id="d1", out=str(out)))
    params = written.inputs["strategy"]["params"]
    assert params["candidates"] == 120 and params["candidate_memory_mb"] == 1024.0
    assert 0.0 < written.extra["select_seconds"] < written.extra["seconds"]
    assert params["method"] and params["gradnorm"] is False
    # The pick after the stream is its own stage on the progress lines, not more "scoring".
    assert f"query: picking 20 of the 120 smallest-margin rows ({strategy})" in capsys.readouterr().out
    scores = run_scores(out / "d1").to_pydict()
    assert "residual" not in scores and all(np.isnan(scores["score"]))  # forward only, no embeddings stored
    good = sorted(k for k, e in zip(scores["key"], scores["error"]) if e is None)
    # In memory: decode every scoreable sample, score it in one batch, gather, select.
    networks = build_from_checkpoint(load_checkpoint(cycle["checkpoint"]))
    spec = spec_for_model("small_cnn", num_classes=4)
    images = np.stack([decode_sample({"png": cycle["samples"][k]}, spec).image for k in good])
    rows = RowScorer(lambda: networks, device="cpu", gradnorm=False, embeddings=True)(
        {"image": images, "key": np.array(good, dtype=object), "shard": np.array(["s"] * len(good), dtype=object)}
    )
    gatherer = CandidateGatherer(120, 4, rows["penultimate"].shape[1])
    gatherer.add(good, rows["margin"], rows["residual"], rows["penultimate"])
    expected = [key for key, _, _ in select_candidates(SelectionSpec(strategy, 20, candidates=120), gatherer.result())]
    assert manifest.load(str(out / "d1")).column("key").to_pylist() == expected


def test_a_diverse_selection_over_its_memory_budget_is_refused_before_scoring(cycle) -> None:
    out = cycle["root"] / "over-budget"
    with pytest.raises(CandidateMemoryError, match=r"M=1000000 x \(C=4 \+ D=64\)"):
        query(
            query_config(cycle, strategy="badge", candidates=1_000_000, candidate_memory_mb=1, run_id="o", out=str(out))
        )
    assert not (out / "o").exists()
