"""Cluster-Margin: k-means labels, the round-robin from the smallest cluster, determinism; and the
diverse-strategy registry, looped over so every entry is checked."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.acquisition import (
    DIVERSE_STRATEGIES,
    CandidateGatherer,
    SelectionSpec,
    cluster_margin_select,
    kmeans_labels,
    select_diverse,
)
from pipeline.acquisition.cluster_margin import default_clusters


def _brute_force_round_robin(labels, keys, k, seed):
    """The paper's round-robin written plainly: clusters by size (then first member), each turn
    one member per cluster, members in a seeded random order."""
    from pipeline._keyhash import key_uniforms

    draw = key_uniforms(keys, seed, "lplgrad.cmargin")
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    clusters = sorted(members.values(), key=lambda rows: (len(rows), rows[0]))
    queues = [sorted(rows, key=lambda i: draw[i]) for rows in clusters]
    picks = []
    turn = 0
    while len(picks) < min(k, len(labels)):
        for queue in queues:
            if turn < len(queue) and len(picks) < k:
                picks.append(queue[turn])
        turn += 1
    return picks


@pytest.mark.parametrize("k", [1, 5, 23, 60, 100])
def test_round_robin_matches_the_plain_algorithm(k: int) -> None:
    rng = np.random.default_rng(k)
    labels = rng.choice([0, 1, 2, 3, 4, 9], size=60, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    keys = [f"key{i:03d}" for i in range(60)]
    assert cluster_margin_select(labels, keys, k, seed=4) == _brute_force_round_robin(labels, keys, k, 4)


def test_round_robin_takes_one_per_cluster_smallest_first() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2])  # sizes 4, 2, 1
    picks = cluster_margin_select(labels, [f"k{i}" for i in range(7)], 3, seed=0)
    assert picks[0] == 6 and picks[1] in (4, 5) and picks[2] in (0, 1, 2, 3)
    assert sorted(cluster_margin_select(labels, [f"k{i}" for i in range(7)], 50, seed=0)) == list(range(7))


def test_kmeans_separates_far_apart_groups_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    truth = np.repeat([0, 1, 2], 40)
    points = (centres[truth] + rng.standard_normal((120, 2))).astype(np.float32)
    labels = kmeans_labels(points, 3, seed=1)
    assert len({tuple(np.unique(labels[truth == g])) for g in range(3)}) == 3  # one label per group
    assert all(len(np.unique(labels[truth == g])) == 1 for g in range(3))
    assert np.array_equal(labels, kmeans_labels(points, 3, seed=1))


def _candidates(n: int = 400, c: int = 5, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    gatherer = CandidateGatherer(n, c, d)
    logits = rng.standard_normal((n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    residuals = probs.copy()
    residuals[np.arange(n), probs.argmax(1)] -= 1
    top = np.sort(probs, 1)
    gatherer.add([f"r{i:04d}" for i in range(n)], top[:, -1] - top[:, -2], residuals, rng.standard_normal((n, d)))
    return gatherer.result()


@pytest.mark.parametrize("name", sorted(DIVERSE_STRATEGIES))
def test_every_diverse_strategy_is_deterministic_bounded_and_seeded(name: str) -> None:
    candidates = _candidates()
    picks = select_diverse(name, candidates, 50, seed=3)
    assert len(picks) == 50 == len(set(picks)) and all(0 <= p < len(candidates) for p in picks)
    assert picks == select_diverse(name, candidates, 50, seed=3)
    assert picks != select_diverse(name, candidates, 50, seed=4)
    assert sorted(select_diverse(name, candidates, 10_000, seed=3)) == list(range(len(candidates)))
    spec = SelectionSpec(name, 50, seed=3)
    assert spec.candidates == 100 and spec.manifest_params()["method"] == DIVERSE_STRATEGIES[name].method
    assert SelectionSpec.from_manifest(name, 50, spec.manifest_params()) == spec


def test_selection_spec_validates_diverse_settings_and_leaves_per_sample_params_alone() -> None:
    assert SelectionSpec("margin", 10, candidates=99, clusters=3).manifest_params() == {
        "seed": 0,
        "stochastic": None,
        "beta": None,
    }
    assert SelectionSpec("cluster-margin", 100).clusters == default_clusters(100, 1000) == 10
    with pytest.raises(ValueError, match="candidates must be an integer >= k=100"):
        SelectionSpec("badge", 100, candidates=50)
    with pytest.raises(ValueError, match="no stochastic variant"):
        SelectionSpec("badge", 100, stochastic="power", beta=1.0)
    with pytest.raises(ValueError, match="clusters must be an integer"):
        SelectionSpec("cluster-margin", 10, candidates=20, clusters=21)
