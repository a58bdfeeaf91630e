"""The candidate gatherer: the exact M smallest margins (ties by key) with their embeddings, in
bounded memory, whatever the batching; and the budget refusal before scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.acquisition import (
    CandidateGatherer,
    CandidateMemoryError,
    candidate_bytes,
    check_candidate_memory,
    prediction_residuals,
)


def _rows(n: int, c: int, d: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [f"k{i:05d}" for i in rng.permutation(n)]
    # Few distinct margins: many ties, so the key order decides who enters.
    margins = rng.integers(0, 20, n).astype(np.float64) / 20
    margins[rng.random(n) < 0.05] = np.nan  # error rows
    return keys, margins, rng.standard_normal((n, c)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def _brute_force(keys, margins, m):
    finite = [i for i in range(len(keys)) if np.isfinite(margins[i])]
    return sorted(finite, key=lambda i: (margins[i], keys[i]))[:m]


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_gatherer_keeps_the_exact_smallest_margins_in_canonical_order(batch: int) -> None:
    keys, margins, residuals, features = _rows(600, 3, 5, seed=batch)
    shards = np.array([f"s{i % 4}" for i in range(600)], dtype=object)
    gatherer = CandidateGatherer(50, 3, 5, extras=("shard",))
    for start in range(0, 600, batch):
        part = slice(start, start + batch)
        gatherer.add(keys[part], margins[part], residuals[part], features[part], {"shard": shards[part]})
    result = gatherer.result()
    expected = _brute_force(keys, margins, 50)
    assert result.keys == [keys[i] for i in expected]
    assert np.array_equal(result.margins, margins[expected])
    assert np.array_equal(result.residuals, residuals[expected]) and np.array_equal(result.features, features[expected])
    assert list(result.extras["shard"]) == list(shards[expected])
    assert gatherer.offered == int(np.isfinite(margins).sum())


def test_gatherer_does_not_depend_on_arrival_order_and_holds_fewer_when_fewer_scored() -> None:
    keys, margins, residuals, features = _rows(300, 2, 4, seed=3)
    results = []
    for order in (np.arange(300), np.random.default_rng(1).permutation(300)):
        gatherer = CandidateGatherer(40, 2, 4)
        for part in np.array_split(order, 9):
            gatherer.add([keys[i] for i in part], margins[part], residuals[part], features[part])
        results.append(gatherer.result())
    assert results[0].keys == results[1].keys
    assert np.array_equal(results[0].features, results[1].features)
    small = CandidateGatherer(1000, 2, 4)
    small.add(keys, margins, residuals, features)
    assert len(small) == int(np.isfinite(margins).sum()) == len(small.result().keys)


def test_gatherer_memory_is_bounded_by_m_whatever_the_stream_length() -> None:
    gatherer = CandidateGatherer(100, 10, 64)
    before = gatherer.nbytes
    for seed in range(20):
        keys, margins, residuals, features = _rows(500, 10, 64, seed)
        gatherer.add([f"{seed}-{k}" for k in keys], margins, residuals, features)
    assert gatherer.nbytes == before and len(gatherer) == 100
    # The arrays are M x (C + D) float32 plus the margin and key per row.
    assert before <= candidate_bytes(100, 10, 64)


def test_gatherer_rejects_batches_of_the_wrong_shape() -> None:
    gatherer = CandidateGatherer(10, 3, 4, extras=("shard",))
    with pytest.raises(ValueError, match="expected C=3 and D=4"):
        gatherer.add(["a"], np.array([0.1]), np.zeros((1, 2)), np.zeros((1, 4)), {"shard": ["s"]})
    with pytest.raises(ValueError, match="lacks the extra columns"):
        gatherer.add(["a"], np.array([0.1]), np.zeros((1, 3)), np.zeros((1, 4)))


def test_budget_refusal_names_every_size_before_any_scoring() -> None:
    assert check_candidate_memory(100_000, 10, 128, budget_mb=1024) == candidate_bytes(100_000, 10, 128)
    with pytest.raises(CandidateMemoryError) as refused:
        check_candidate_memory(1_000_000, 10, 512, budget_mb=1024)
    message = str(refused.value)
    for part in ("M=1000000", "C=10", "D=512", "2,104,000,000 bytes", "budget of 1024 MiB", "candidates="):
        assert part in message


def test_prediction_residuals_are_the_logit_gradient_at_the_predicted_label() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    residuals = prediction_residuals(logits)
    loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(residuals, grad, atol=1e-6)
    assert residuals[1].argmin() == 0  # a tie predicts the first class
