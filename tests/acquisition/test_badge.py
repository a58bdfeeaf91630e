"""BADGE: gradient embeddings, k-means++ seeding (materialised and factored), and the memory refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.acquisition import (
    BadgeMemoryError,
    badge_embeddings,
    badge_select,
    check_badge_memory,
    kmeanspp_seeding,
    prediction_residuals,
)


def test_embedding_is_the_last_layer_gradient_at_the_predicted_label() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    features = torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 0.5]])
    embedded = badge_embeddings(logits, features)
    p = 1 / (1 + math.exp(-2.0))  # softmax of (2, 0) at class 0
    expected_first = torch.tensor([(p - 1) * 1, (p - 1) * 2, (p - 1) * 3, (1 - p) * 1, (1 - p) * 2, (1 - p) * 3])
    assert torch.allclose(embedded[0], expected_first, atol=1e-6)
    # Equal logits predict class 0 (argmax's first), p = (0.5, 0.5).
    assert torch.allclose(embedded[1], torch.tensor([-0.5, 0.5, -0.25, 0.5, -0.5, 0.25]))
    # The gradient of CE w.r.t. the weight, by autograd, is the same thing.
    weight = torch.zeros(2, 3, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(features[:1] @ weight.T + logits[:1], torch.tensor([0]))
    loss.backward()
    assert torch.allclose(weight.grad.flatten(), embedded[0], atol=1e-6)


def test_kmeanspp_starts_at_the_largest_norm_and_covers_distant_clusters() -> None:
    # Three tight, far-apart clusters; the largest-norm point sits in the third.
    clusters = [torch.tensor([0.0, 0.0]), torch.tensor([100.0, 0.0]), torch.tensor([0.0, 200.0])]
    points = torch.cat([c + 0.01 * torch.arange(4, dtype=torch.float32)[:, None] for c in clusters])
    picks = kmeanspp_seeding(points, 3, seed=0)
    assert picks[0] == 11  # (0.03, 200.03): the largest norm
    assert sorted(p // 4 for p in picks) == [0, 1, 2]  # one per cluster: D² sampling makes it near-certain
    assert kmeanspp_seeding(points, 3, seed=0) == picks  # reproducible by seed
    assert len(set(kmeanspp_seeding(points, 12, seed=5))) == 12  # never a repeat
    assert kmeanspp_seeding(points, 50, seed=0) == kmeanspp_seeding(points, 12, seed=0)  # at most N


def test_identical_points_are_drawn_without_repeats() -> None:
    picks = kmeanspp_seeding(torch.ones(5, 3), 4, seed=1)
    assert len(set(picks)) == 4 and picks[0] == 0


def test_memory_budget_refusal_names_sizes_and_the_fix() -> None:
    assert check_badge_memory(10_000, 10, 64, budget_mb=100) == 10_000 * 10 * 64 * 4
    with pytest.raises(
        BadgeMemoryError, match=r"1000000 x 10 x 512 float32 embeddings = 19531 MiB, over the budget of 2048 MiB"
    ):
        check_badge_memory(1_000_000, 10, 512, budget_mb=2048)


def _factors(n: int, c: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    features = torch.randn(n, d, generator=generator, dtype=torch.float64).relu()
    return logits, features


def _grouped_kmeanspp(embeddings: torch.Tensor, k: int, seed: int) -> list[int]:
    """Brute force on materialised embeddings: full distances every pick, and the draw laid over
    rows grouped by nearest centre (a group by cumulative group weights, then a row in it)."""
    points = embeddings.double().numpy()
    rng = np.random.default_rng(seed)
    picks = [int(np.argmax((points * points).sum(1)))]
    nearest2 = ((points - points[picks[0]]) ** 2).sum(1)
    nearest2[picks[0]] = 0.0
    assigned = np.zeros(len(points), dtype=np.int64)
    chosen = np.zeros(len(points), dtype=bool)
    chosen[picks[0]] = True
    while len(picks) < min(k, len(points)):
        groups = [np.flatnonzero(assigned == g) for g in range(len(picks))]
        cumulative = np.cumsum([nearest2[rows].sum() for rows in groups])
        target = rng.random() * cumulative[-1]
        g = int(np.searchsorted(cumulative, target, side="right"))
        within = np.cumsum(nearest2[groups[g]])
        index = int(groups[g][np.searchsorted(within, target - (cumulative[g - 1] if g else 0.0), side="right")])
        assert not chosen[index]
        distances = ((points - points[index]) ** 2).sum(1)
        closer = distances < nearest2
        nearest2[closer], assigned[closer] = distances[closer], len(picks)
        nearest2[index], assigned[index] = 0.0, len(picks)
        picks.append(index)
        chosen[index] = True
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factored_seeding_picks_what_brute_force_on_materialised_embeddings_picks(seed: int) -> None:
    logits, features = _factors(300, 4, 6, seed)
    residuals = prediction_residuals(logits).double()
    embeddings = badge_embeddings(logits, features).double()
    assert torch.allclose(embeddings, (residuals[:, :, None] * features[:, None, :]).flatten(1))
    for k in (1, 25, 120):
        assert badge_select(residuals, features, k, seed) == _grouped_kmeanspp(embeddings, k, seed)


def test_factored_distances_equal_the_materialised_ones() -> None:
    from pipeline.acquisition.badge import _FactoredSeeding

    logits, features = _factors(50, 3, 5, 7)
    residuals = prediction_residuals(logits).double()
    embeddings = (residuals[:, :, None] * features[:, None, :]).flatten(1)
    seeding = _FactoredSeeding(residuals, features, k=5)
    for centre in (4, 17, 30):
        seeding.add_centre(centre)
    brute = torch.cdist(embeddings, embeddings[[4, 17, 30]]).pow(2)
    assert np.allclose(seeding.nearest2, brute.min(1).values.numpy(), rtol=1e-9, atol=1e-12)
    assert np.array_equal(seeding.assigned, brute.argmin(1).numpy())
    assert sorted(np.concatenate(seeding.members).tolist()) == list(range(50))  # every row in one group
    assert seeding.recomputed < 50 * 3  # the bounds skipped some rows, exactly


def test_factored_seeding_is_deterministic_and_without_repeats() -> None:
    logits, features = _factors(400, 10, 16, 3)
    residuals = prediction_residuals(logits).float()
    picks = badge_select(residuals.numpy(), features.float().numpy(), 200, seed=11)
    assert picks == badge_select(residuals.numpy(), features.float().numpy(), 200, seed=11)
    assert picks != badge_select(residuals.numpy(), features.float().numpy(), 200, seed=12)
    assert len(set(picks)) == 200
    norms = residuals.norm(dim=1) * features.float().norm(dim=1)
    assert picks[0] == int(norms.argmax())
    duplicates = badge_select(torch.ones(6, 2), torch.ones(6, 3), 6, seed=0)
    assert sorted(duplicates) == list(range(6))
