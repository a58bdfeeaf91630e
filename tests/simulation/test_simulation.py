"""`lplgrad simulate` on the in-memory engine: chains, BADGE, stochastic draws, every new column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.acquisition import CandidateMemoryError
from pipeline.learning_curves import read_results
from pipeline.pools import build_pool, synthetic
from pipeline.simulation import initial_keys, subset_rows
from ray_jobs import simulate


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    build_pool(synthetic(90, seed=5, num_classes=3, image_size=28, channels=1), str(root / "pool"))
    build_pool(synthetic(30, seed=6, num_classes=3, image_size=28, channels=1, split="test"), str(root / "test"))
    return root


def test_two_cycles_with_a_stochastic_chain_and_badge_write_every_column(pools, tmp_path) -> None:
    config = simulate.JOB.parse_args(
        [
            f"pool={pools / 'pool'}",
            f"test_pool={pools / 'test'}",
            "strategies=[lplgrad+power,badge,random]",
            "seeds=[0,1]",
            "initial=12",
            "per_cycle=10",
            "cycles=2",
            "epochs=1",
            "batch_size=12",
            "subset=40",
            "augment=gray28",
            f"out={tmp_path / 'sim'}",
        ]
    )
    assert config.engine == "memory"
    rows = simulate.run(config)
    assert sorted({(r.strategy, r.seed) for r in rows}) == [
        (s, seed) for s in ("badge", "lplgrad+power", "random") for seed in (0, 1)
    ]
    keys = sorted(s.key for s in synthetic(90, seed=5, num_classes=3, image_size=28, channels=1))
    for row in read_results(tmp_path / "sim" / "results.parquet"):
        assert 0.0 <= row["test_accuracy"] <= 1.0
        if row["cycle"] == 0:
            assert row["labeled"] == 12 and sum(json.loads(row["class_mix"])) == 10 and row["query_seconds"] >= 0
            picked = json.loads(row["picked"])  # the batch's keys, new to the labeled set
            assert len(set(picked)) == 10 and not set(picked) & set(initial_keys(keys, 12, row["seed"]))
        else:
            assert row["labeled"] == 22 and row["class_mix"] is None and row["picked"] is None
    lplgrad = [r for r in rows if r.strategy == "lplgrad+power" and r.cycle == 0]
    assert all(r.mean_score > 0 for r in lplgrad)  # the gradient norm was computed for the power draw
    # Every chain of a seed starts from the same shared first model.
    first = {(r.strategy, r.seed): r.test_accuracy for r in rows if r.cycle == 0}
    assert first[("badge", 0)] == first[("random", 0)] == first[("lplgrad+power", 0)]
    summary = pq.read_table(tmp_path / "sim" / "summary.parquet").to_pylist()
    assert {"diff", "diff_low", "diff_high", "mean", "std"} <= summary[0].keys()
    aulc = {r["strategy"]: r for r in pq.read_table(tmp_path / "sim" / "aulc.parquet").to_pylist()}
    assert set(aulc) == {"badge", "lplgrad+power", "random"} and aulc["random"]["diff"] == 0.0
    text = (tmp_path / "sim" / "results.md").read_text()
    assert "Accuracy minus random" in text and "| badge |" in text and "AULC" in text
    assert (tmp_path / "sim" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sim" / "summary.csv").exists() and (tmp_path / "sim" / "aulc.csv").exists()
    assert "lplgrad+power" in (tmp_path / "sim" / "report.html").read_text()


def test_a_diverse_chain_over_its_candidate_budget_is_refused_before_any_training(pools, tmp_path) -> None:
    config = simulate.JOB.parse_args(
        [
            f"pool={pools / 'pool'}",
            f"test_pool={pools / 'test'}",
            "strategies=[badge]",
            "candidate_memory_mb=0.001",
            f"out={tmp_path / 'sim'}",
            "seeds=[0]",
        ]
    )
    with pytest.raises(CandidateMemoryError, match=r"M=90 x \(C=3 \+ D=\d+\) float32 .* over the budget of 0.001 MiB"):
        simulate.run(config)
    assert not (tmp_path / "sim" / "results.parquet").exists()


def test_configuration_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'bald'"):
        simulate.SimulateConfig(pool="x", strategies=("bald",))
    # The diverse strategies run on both engines (the Ray engine through the query job).
    assert simulate.SimulateConfig(pool="x", strategies=("badge", "cluster-margin"), engine="ray").engine == "ray"
    with pytest.raises(ValueError, match="candidate_memory_mb must be positive, got 0"):
        simulate.SimulateConfig(pool="x", candidate_memory_mb=0)
    with pytest.raises(ValueError, match="candidates must be an integer >= k=10, got 5"):
        simulate.SimulateConfig(pool="x", per_cycle=10, candidates=5)
    with pytest.raises(ValueError, match=r"clusters must be an integer in \[1, candidates=40\], got 41"):
        simulate.SimulateConfig(pool="x", per_cycle=10, candidates=40, clusters=41)
    assert simulate.SimulateConfig(pool="x", per_cycle=10, candidates=40, clusters=10).protocol().clusters == 10
    with pytest.raises(ValueError, match="augment 'crop' is unknown"):
        simulate.SimulateConfig(pool="x", augment="crop")
    with pytest.raises(ValueError, match="proxy modes run through the Ray jobs"):
        simulate.SimulateConfig(pool="x", test_pool="y", modes=("proxy",))


def test_subsets_are_seeded_and_drawn_from_the_unlabeled_rows() -> None:
    keys = [f"k{i:03d}" for i in range(200)]
    unlabeled = np.arange(50, 200)
    chosen = subset_rows(keys, unlabeled, 30, seed=4)
    assert len(chosen) == 30 and set(chosen) <= set(unlabeled) and list(chosen) == sorted(chosen)
    assert list(chosen) == list(subset_rows(keys, unlabeled, 30, seed=4))
    assert list(subset_rows(keys, unlabeled, None, seed=4)) == list(unlabeled)
    assert initial_keys(keys, 10, 0) == initial_keys(list(reversed(keys)), 10, 0)
