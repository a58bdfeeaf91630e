"""Incremental nightly queries end to end on a local Ray: a tar pool of 4 shards x 40 samples (one
corrupt), fresh small_cnn checkpoints saved as the training job saves them, and a chain of nights
under one output root that unchanged, adds, removes shards, changes the checkpoint and excludes
keys. The tests share the chain: each night builds on the one before, so a test asks the chain to
run through the nights it checks (:class:`Nights`); each step runs once, in chain order, whichever
test asks first, and tests pass in any order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _tar_shards import write_png_shard as write_shard

from pipeline import manifest
from pipeline.acquisition.selection import select_topk
from pipeline.checkpoint import ModelSpec, save_untrained_checkpoint
from pipeline.manifest.verify import verify_run
from pipeline.pools import encode_image, synthetic
from ray_jobs._shared.querying import QuerySpec, query

CLASSES = [str(c) for c in range(4)]
PER_SHARD = 40


def pool_samples(start: int, count: int, seed: int) -> list[tuple[str, bytes]]:
    source = synthetic(count, seed=seed, num_classes=4, image_size=28, channels=1)
    return [(f"s{start + i:04d}", encode_image(s.image, "png")) for i, s in enumerate(source)]


def make_checkpoint(directory: Path, seed: int) -> str:
    """Fresh small_cnn weights with the keys ray_jobs/train.py writes (no training needed)."""
    return save_untrained_checkpoint(directory, ModelSpec("small_cnn", num_classes=len(CLASSES)), CLASSES, seed)


class Nights:
    """The chain of nights under one output root, run step by step on demand (:meth:`through`).

    Attributes:
        root: The test's directory (pool, checkpoints, runs).
        out: The nightly output root.
        a, b: Two small_cnn checkpoints.
        written: Run id -> the manifest its query returned.
        moved: Run id -> where a run moved out of `out` now lives.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.out = root, root / "nightly"
        self.a, self.b = make_checkpoint(root / "ckpt-a", 0), make_checkpoint(root / "ckpt-b", 1)
        self.written: dict[str, manifest.Manifest] = {}
        self.moved: dict[str, Path] = {}
        self._done: dict[Any, BaseException | None] = {}

    def night(self, run_id: str, **overrides: Any) -> manifest.Manifest:
        values = dict(
            pool=str(self.root / "pool"),
            checkpoint=self.a,
            strategy="lplgrad",  # the reused rows must carry gradient norms; the default (margin) has none
            k=12,
            out=str(self.out),
            run_id=run_id,
            batch_size=32,
            actors=1,
            cpus_per_actor=0.5,
        )
        values.update(overrides)
        self.written[run_id] = query(QuerySpec(**values))
        return self.written[run_id]

    def run_dir(self, run_id: str) -> Path:
        return self.moved.get(run_id, self.out / run_id)

    def through(self, last: Any) -> Nights:
        """Run every step of :data:`STEPS` up to and including `last` that has not run yet."""
        for step in STEPS[: STEPS.index(last) + 1]:
            if step not in self._done:
                try:
                    step(self)
                except BaseException as error:
                    self._done[step] = error
                    raise
                self._done[step] = None
            elif self._done[step] is not None:
                pytest.fail(f"an earlier night of the chain failed ({step.__name__}): {self._done[step]!r}")
        return self


def unchanged_pool(env: Nights) -> None:
    env.night("night-01")
    env.night("night-02")  # a new id: begin_run's no-op does not apply


def added_shard(env: Nights) -> None:
    write_shard(env.root / "pool" / "shard-0004.tar", pool_samples(4 * PER_SHARD, PER_SHARD, seed=4))
    # night-02 holds its own copies: the chain needs no older run under the output root.
    env.moved["night-01"] = env.root / "moved" / "night-01"
    shutil.move(env.out / "night-01", env.moved["night-01"])
    env.night("night-03")
    env.night("full-03", out=str(env.root / "full"), incremental=False)  # the same pool from scratch


def removed_shard(env: Nights) -> None:
    shutil.move(env.root / "pool" / "shard-0001.tar", env.root / "shard-0001.tar")
    env.night("night-04")


def new_checkpoint(env: Nights) -> None:
    env.night("night-05", checkpoint=env.b)


def exclusions(env: Nights) -> None:
    # Night 6 excludes night 5's selection (the output root names the newest run before it).
    env.night("night-06", checkpoint=env.b, exclude_manifests=(str(env.out),))
    # Night 7 excludes nothing: the 12 keys night 6 had no row for are read and scored again.
    env.night("night-07", checkpoint=env.b)


STEPS = (unchanged_pool, added_shard, removed_shard, new_checkpoint, exclusions)


@pytest.fixture(scope="module")
def nights(ray_local, tmp_path_factory) -> Nights:
    root = tmp_path_factory.mktemp("incremental")
    (root / "pool").mkdir()
    for s in range(4):
        samples = pool_samples(s * PER_SHARD, PER_SHARD, seed=s)
        if s == 1:
            samples[7] = ("corrupt-0001", b"this is not a png")
        write_shard(root / "pool" / f"shard-{s:04d}.tar", samples)
    return Nights(root)


def by_shard(written: manifest.Manifest) -> dict[str, Any]:
    return {Path(entry["uri"]).name: entry for entry in written.shards}


def scores(run: Path) -> pd.DataFrame:
    parts = json.loads((run / "manifest.json").read_text())["files"]["scores"]
    return pa.concat_tables([pq.read_table(run / part) for part in parts]).sort_by("key").to_pandas()


def test_an_unchanged_pool_reuses_every_shard_with_identical_results(nights) -> None:
    out, first_dir = nights.through(unchanged_pool).out, nights.run_dir("night-01")
    first, second = nights.written["night-01"], nights.written["night-02"]
    assert [e["reused_from"] for e in first.shards] == [None] * 4
    assert sum(e["rows_scored"] for e in first.shards) == 4 * PER_SHARD
    assert [e["reused_from"] for e in second.shards] == ["night-01"] * 4
    assert [e["rows_scored"] for e in second.shards] == [0] * 4  # the scoring actors saw nothing
    assert second.reuse["source"] == str(out / "night-01")
    assert second.inputs_fingerprint == first.inputs_fingerprint
    assert second.counts == first.counts
    assert first.counts.to_dict() == {"scored": 159, "excluded": 0, "errors": 1, "selected": 12}
    assert second.score_summary == first.score_summary
    assert manifest.load(str(out / "night-02")).equals(manifest.load(str(first_dir)))
    assert scores(out / "night-02").equals(scores(first_dir))  # bit for bit, NaN where NaN
    assert manifest.load_errors(str(out / "night-02")).column("key").to_pylist() == ["corrupt-0001"]
    assert verify_run(str(out / "night-02")).ok


def test_an_added_shard_is_the_only_one_scored(nights) -> None:
    out = nights.through(added_shard).out
    third = by_shard(nights.written["night-03"])
    assert third["shard-0004.tar"]["reused_from"] is None
    assert third["shard-0004.tar"]["rows_scored"] == PER_SHARD and third["shard-0004.tar"]["rows_reused"] == 0
    for name in ("shard-0000.tar", "shard-0001.tar", "shard-0002.tar", "shard-0003.tar"):
        assert third[name]["reused_from"] == "night-02" and third[name]["rows_scored"] == 0
    assert third["shard-0001.tar"]["rows_reused"] == PER_SHARD  # 39 scored rows and the corrupt one
    # The same pool scored from scratch selects the same rows with the same scores.
    full = nights.written["full-03"]
    assert sum(e["rows_scored"] for e in full.shards) == 5 * PER_SHARD
    assert (
        manifest.load(str(out / "night-03")).column("key").to_pylist()
        == manifest.load(str(nights.root / "full" / "full-03")).column("key").to_pylist()
    )
    reused, fresh = scores(out / "night-03"), scores(nights.root / "full" / "full-03")
    assert list(reused["key"]) == list(fresh["key"])
    assert np.allclose(reused["score"], fresh["score"], rtol=1e-5, equal_nan=True)


def test_a_removed_shard_drops_its_keys(nights) -> None:
    out = nights.through(removed_shard).out
    fourth = nights.written["night-04"]
    assert [Path(e["uri"]).name for e in fourth.shards] == [f"shard-{s:04d}.tar" for s in (0, 2, 3, 4)]
    assert [e["reused_from"] for e in fourth.shards] == ["night-03"] * 4
    before, after = scores(out / "night-03"), scores(out / "night-04")
    kept = before[~before["shard"].str.endswith("shard-0001.tar")].reset_index(drop=True)
    assert after.equals(kept)
    assert fourth.counts.errors == 0  # the corrupt sample left with its shard
    assert not any(
        s.endswith("shard-0001.tar") for s in manifest.load(str(out / "night-04")).column("shard").to_pylist()
    )


def test_a_new_checkpoint_reuses_nothing(nights) -> None:
    fifth = nights.through(new_checkpoint).written["night-05"]
    assert [e["reused_from"] for e in fifth.shards] == [None] * 4
    assert sum(e["rows_scored"] for e in fifth.shards) == 4 * PER_SHARD
    assert "checkpoint changed" in fifth.reuse["reason"]


def test_exclusions_apply_to_reused_rows_and_lifted_ones_are_scored_again(nights) -> None:
    out = nights.through(exclusions).out
    picked = manifest.load(str(out / "night-05")).column("key").to_pylist()
    sixth = nights.written["night-06"]
    assert [e["reused_from"] for e in sixth.shards] == ["night-05"] * 4
    assert sixth.counts.excluded == 12
    assert sorted(manifest.load_excluded(str(out / "night-06")).column("key").to_pylist()) == sorted(picked)
    assert not set(picked) & set(scores(out / "night-06")["key"])  # as a full run: excluded rows are not scores
    previous = scores(out / "night-05")
    candidates = previous[~previous["key"].isin(picked) & previous["error"].isna()]
    expected = select_topk(list(candidates["key"]), candidates["score"].to_numpy(np.float64), 12)
    assert manifest.load(str(out / "night-06")).column("key").to_pylist() == expected
    seventh = nights.written["night-07"]
    assert [e["reused_from"] for e in seventh.shards] == ["night-06"] * 4
    assert sum(e["rows_scored"] for e in seventh.shards) == 12
    assert manifest.load(str(out / "night-07")).column("key").to_pylist() == picked
    again = scores(out / "night-07")
    assert list(again["key"]) == list(previous["key"])
    assert np.allclose(again["score"], previous["score"], rtol=1e-5, equal_nan=True)
