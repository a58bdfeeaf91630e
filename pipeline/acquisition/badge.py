"""BADGE: batch active learning by diverse gradient embeddings (Ash, Zhang, Krishnamurthy, Langford,
Agarwal, "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds", ICLR 2020).

Each candidate is embedded by the gradient of the cross-entropy at its own predicted label with
respect to the last layer's weights: ``(p - onehot(argmax p)) ⊗ h(x)``, ``[C * D]``, where ``p``
is the softmax output and ``h`` the penultimate features. Its norm grows with uncertainty, its
direction says what the sample would change. k-means++ seeding over the embeddings then picks a
batch that is both uncertain and diverse.

Like core-set it is a set function over one gathered matrix (the simulation's random subset),
so its memory is ``subset x C x D`` floats: :func:`check_badge_memory` refuses, before any
scoring, a subset that would not fit the stated budget.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["BadgeMemoryError", "badge_embeddings", "check_badge_memory", "kmeanspp_seeding"]


class BadgeMemoryError(ValueError):
    """The BADGE embedding matrix of a subset would exceed the memory budget."""


def check_badge_memory(candidates: int, num_classes: int, feature_dim: int, budget_mb: float) -> int:
    """Bytes of the float32 embedding matrix; raises when it exceeds ``budget_mb``.

    Args:
        candidates: Rows to embed (the subset size).
        num_classes: C.
        feature_dim: D, the penultimate width.
        budget_mb: Allowed size of the matrix in MiB.

    Returns:
        The matrix size in bytes.

    Raises:
        BadgeMemoryError: Naming the size, the budget and how to fit it.
    """
    size = candidates * num_classes * feature_dim * 4
    if size > budget_mb * 2**20:
        raise BadgeMemoryError(
            f"BADGE needs {candidates} x {num_classes} x {feature_dim} float32 embeddings = {size / 2**20:.0f} MiB, "
            f"over the budget of {budget_mb:.0f} MiB (set subset= smaller, or raise badge_memory_mb=)"
        )
    return size


def badge_embeddings(logits: Tensor, features: Tensor) -> Tensor:
    """Last-layer gradient embeddings of a batch.

    Args:
        logits: ``[B, C]`` classifier outputs.
        features: ``[B, D]`` inputs of the classifier's last linear layer.

    Returns:
        ``[B, C * D]`` float32: ``(p - onehot(argmax p))`` outer ``h``, flattened class-major.
    """
    probs = torch.softmax(logits.float(), dim=1)
    residual = probs - torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    return (residual[:, :, None] * features.float()[:, None, :]).flatten(1)


def kmeanspp_seeding(embeddings: Tensor, k: int, seed: int) -> list[int]:
    """k-means++ seeding as in the authors' code: the largest-norm point first, then each next
    centre drawn with probability proportional to its squared distance to the nearest centre.

    Args:
        embeddings: ``[N, E]`` candidate embeddings.
        k: Centres to pick; at most N are returned.
        seed: Seed of the draws (a NumPy generator of its own, never a global one).

    Returns:
        Indices into ``embeddings``, in pick order, without repeats. When every remaining point
        coincides with a centre (all distances 0), the rest are drawn uniformly.
    """
    n = embeddings.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    points = embeddings.double()
    squared_norms = (points * points).sum(dim=1)  # [N]; distances by ||x||² - 2 x·c + ||c||², no [N, E] temporaries
    rng = np.random.default_rng(seed)
    first = int(torch.argmax(squared_norms))
    picks = [first]
    chosen = np.zeros(n, dtype=bool)
    chosen[first] = True
    nearest = _distances_squared(points, squared_norms, first)
    while len(picks) < k:
        weights = np.where(chosen, 0.0, nearest.numpy())
        total = weights.sum()
        if total > 0:
            # Inverse-CDF draw: one uniform against the cumulative weights.
            index = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
            index = min(index, n - 1)
            if chosen[index]:  # only reachable through rounding at a zero-weight boundary
                index = int(np.flatnonzero(~chosen)[np.argmax(weights[~chosen])])
        else:
            index = int(rng.choice(np.flatnonzero(~chosen)))
        picks.append(index)
        chosen[index] = True
        nearest = torch.minimum(nearest, _distances_squared(points, squared_norms, index))
    return picks


def _distances_squared(points: Tensor, squared_norms: Tensor, centre: int) -> Tensor:
    distances = squared_norms - 2.0 * (points @ points[centre]) + squared_norms[centre]
    return distances.clamp_(min=0.0)
