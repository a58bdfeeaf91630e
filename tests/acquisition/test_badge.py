"""BADGE: gradient embeddings, k-means++ seeding in factored form against brute force on the
materialised embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.acquisition import badge_select, prediction_residuals


def _embeddings(residuals: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The materialised gradient embeddings [N, C * D], class-major: what the factored form avoids."""
    return (residuals[:, :, None] * features[:, None, :]).flatten(1)


def test_embedding_is_the_last_layer_gradient_at_the_predicted_label() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    features = torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 0.5]])
    embedded = _embeddings(prediction_residuals(logits), features)
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


def test_seeding_starts_at_the_largest_norm_and_covers_distant_clusters() -> None:
    # Three tight, far-apart clusters; the largest-norm point sits in the third. Residuals of ones
    # make the embedding the point itself.
    clusters = [torch.tensor([0.0, 0.0]), torch.tensor([100.0, 0.0]), torch.tensor([0.0, 200.0])]
    points = torch.cat([c + 0.01 * torch.arange(4, dtype=torch.float32)[:, None] for c in clusters])
    ones = torch.ones(len(points), 1)
    picks = badge_select(ones, points, 3, seed=0)
    assert picks[0] == 11  # (0.03, 200.03): the largest norm
    assert sorted(p // 4 for p in picks) == [0, 1, 2]  # one per cluster: D² sampling makes it near-certain
    assert badge_select(ones, points, 3, seed=0) == picks  # reproducible by seed
    assert len(set(badge_select(ones, points, 12, seed=5))) == 12  # never a repeat
    assert badge_select(ones, points, 50, seed=0) == badge_select(ones, points, 12, seed=0)  # at most M


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
    embeddings = _embeddings(residuals, features)
    for k in (1, 25, 120):
        assert badge_select(residuals, features, k, seed) == _grouped_kmeanspp(embeddings, k, seed)


def test_factored_distances_equal_the_materialised_ones() -> None:
    from pipeline.acquisition.badge import _FactoredSeeding

    logits, features = _factors(50, 3, 5, 7)
    residuals = prediction_residuals(logits).double()
    embeddings = _embeddings(residuals, features)
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
