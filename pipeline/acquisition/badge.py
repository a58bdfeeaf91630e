"""BADGE: batch active learning by diverse gradient embeddings (Ash, Zhang, Krishnamurthy, Langford,
Agarwal, "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds", ICLR 2020).

Each candidate is embedded by the gradient of the cross-entropy at its own predicted label with
respect to the last layer's weights: ``(p - onehot(argmax p)) ⊗ h(x)``, ``[C * D]``, where ``p``
is the softmax output and ``h`` the penultimate features. Its norm grows with uncertainty, its
direction says what the sample would change. k-means++ seeding over the embeddings then picks a
batch that is both uncertain and diverse.

Two forms of the same seeding:

- :func:`kmeanspp_seeding` over a materialised ``[N, C * D]`` matrix (the reference; its memory is
  ``N x C x D`` floats, which :func:`check_badge_memory` bounds before any scoring);
- :func:`badge_select` over the factors ``r = p - onehot`` [N, C] and ``h`` [N, D] of a gathered
  candidate set (:mod:`pipeline.acquisition.candidates`), never forming ``r ⊗ h``:
  ``||r_i ⊗ h_i - r_j ⊗ h_j||² = |r_i|²|h_i|² + |r_j|²|h_j|² - 2 (r_i·r_j)(h_i·h_j)``, so a
  candidate costs ``C + D`` floats and one distance ``O(C + D)`` operations.

Cost of :func:`badge_select`: seeding is sequential, each pick needs the distance of every
candidate to the newest centre, so a plain implementation is ``O(k · M · (C + D))`` and reads the
``M x (C + D)`` embeddings k times (memory-bound: about ``k · M · (C + D) · 4 bytes / bandwidth``).
Exact pruning by the triangle inequality (as in accelerated k-means++, Raff, "Exact Acceleration of
K-Means++ and K-Means||", IJCAI 2021) skips a candidate whose distance to its nearest centre ``a``
is at most half the distance from ``a`` to the new centre (it cannot move closer), and one whose
norm differs from the new centre's by at least its current distance; only the rest are gathered
and recomputed. Centre-to-centre distances cost ``O(k² (C + D))`` over the run. How much is
skipped depends on the data (clustered features prune well, isotropic noise hardly):
benchmarks/bench_selection.py measures it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["BadgeMemoryError", "badge_embeddings", "badge_select", "check_badge_memory", "kmeanspp_seeding"]


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
        cumulative = np.cumsum(weights)
        total = cumulative[-1]
        if total > 0:
            # Inverse-CDF draw: one uniform against the cumulative weights.
            index = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
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


def badge_select(residuals: np.ndarray | Tensor, features: np.ndarray | Tensor, k: int, seed: int) -> list[int]:
    """k-means++ seeding over the gradient embeddings ``residuals[i] ⊗ features[i]`` in factored form.

    The same draw as :func:`kmeanspp_seeding` on the materialised embeddings (largest norm first,
    then D² sampling by one inverse-CDF uniform per pick from ``numpy.random.default_rng(seed)``),
    so both pick the same rows up to floating-point rounding of the distances.

    Args:
        residuals: ``[M, C]`` ``p - onehot(argmax p)`` (:func:`~pipeline.acquisition.candidates.prediction_residuals`).
        features: ``[M, D]`` penultimate features.
        k: Rows to pick; at most M are returned.
        seed: Seed of the draws.

    Returns:
        Row indices in pick order, without repeats. When every remaining row coincides with a
        centre (all distances 0), the rest are drawn uniformly, as in :func:`kmeanspp_seeding`.

    Raises:
        ValueError: If the two factors disagree on M.
    """
    r = torch.as_tensor(residuals)
    h = torch.as_tensor(features)
    if r.dim() != 2 or h.dim() != 2 or r.shape[0] != h.shape[0]:
        raise ValueError(
            f"residuals [M, C] and features [M, D] must share M; got {tuple(r.shape)} and {tuple(h.shape)}"
        )
    n = r.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    seeding = _FactoredSeeding(r, h, k)
    rng = np.random.default_rng(seed)
    picks = [int(np.argmax(seeding.norms2))]
    seeding.add_centre(picks[0])
    chosen = np.zeros(n, dtype=bool)
    chosen[picks[0]] = True
    while len(picks) < k:
        weights = seeding.nearest2  # 0 at every centre already
        cumulative = np.cumsum(weights, dtype=np.float64)
        total = cumulative[-1]
        if total > 0:
            index = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
            index = min(index, n - 1)
            if chosen[index]:  # only reachable through rounding at a zero-weight boundary
                index = int(np.flatnonzero(~chosen)[np.argmax(weights[~chosen])])
        else:
            index = int(rng.choice(np.flatnonzero(~chosen)))
        picks.append(index)
        chosen[index] = True
        seeding.add_centre(index)
    return picks


class _FactoredSeeding:
    """Squared distance of every row to its nearest centre, updated one centre at a time.

    Rows live as factors (r [M, C], h [M, D]); centres are kept as copies of their factors
    (``k x (C + D)``) for the centre-to-centre distances the triangle bound needs. Products go
    through torch (BLAS, multi-threaded); the O(M) bookkeeping stays in numpy, whose single-threaded
    elementwise loops do not stall when the machine's cores are busy.
    """

    def __init__(self, r: Tensor, h: Tensor, k: int) -> None:
        dtype = torch.float64 if torch.float64 in (r.dtype, h.dtype) else torch.float32
        self.r, self.h = r.to(dtype).contiguous(), h.to(dtype).contiguous()
        r2 = (self.r * self.r).sum(1).numpy()
        self.h2 = (self.h * self.h).sum(1).numpy()  # [M]
        self.norms2 = r2 * self.h2  # [M] |r ⊗ h|²
        self.r2 = r2
        self.norms = np.sqrt(self.norms2)
        self.nearest2 = np.full_like(self.norms2, np.inf)
        self.nearest_centre = np.zeros(r.shape[0], dtype=np.int64)
        self.centre_r = torch.empty(k, r.shape[1], dtype=dtype)
        self.centre_h = torch.empty(k, h.shape[1], dtype=dtype)
        self.centre_norms2 = np.empty(k, dtype=self.norms2.dtype)
        self.count = 0
        self.recomputed = 0  # rows whose distance was computed, over all centres (pruning diagnostics)

    def _distances2(self, rows: np.ndarray | None, centre: int) -> np.ndarray:
        r_c, h_c = self.r[centre], self.h[centre]
        if rows is None or len(rows) * 3 > len(self.norms2):
            # Most rows are needed: one pass over the whole matrices beats gathering the rows.
            dots = ((self.r @ r_c) * (self.h @ h_c)).numpy()
            sizes = self.norms2
            if rows is not None:
                dots, sizes = dots[rows], sizes[rows]
        else:
            index = torch.from_numpy(rows)
            dots = ((self.r[index] @ r_c) * (self.h[index] @ h_c)).numpy()
            sizes = self.norms2[rows]
        return np.maximum(sizes + self.norms2[centre] - 2.0 * dots, 0.0)

    def add_centre(self, centre: int) -> None:
        j = self.count
        rows = None  # the first centre: every row
        if j:
            # Triangle bound: d(x, c) >= d(a, c) - d(x, a), with a the nearest centre of x, so x cannot
            # move closer when d(a, c)² >= 4 d(x, a)². Norm bound: d(x, c) >= | |x| - |c| |.
            between = ((self.centre_r[:j] @ self.r[centre]) * (self.centre_h[:j] @ self.h[centre])).numpy()
            between = np.maximum(self.centre_norms2[:j] + self.norms2[centre] - 2.0 * between, 0.0)
            gap = self.norms - self.norms[centre]
            near = (between[self.nearest_centre] < 4.0 * self.nearest2) & (gap * gap < self.nearest2)
            rows = np.flatnonzero(near)
        distances = self._distances2(rows, centre)
        self.recomputed += len(distances)
        if rows is None:
            self.nearest2 = distances
        else:
            closer = distances < self.nearest2[rows]
            self.nearest2[rows[closer]] = distances[closer]
            self.nearest_centre[rows[closer]] = j
        self.nearest2[centre] = 0.0
        self.nearest_centre[centre] = j
        self.centre_r[j], self.centre_h[j] = self.r[centre], self.h[centre]
        self.centre_norms2[j] = self.norms2[centre]
        self.count += 1
