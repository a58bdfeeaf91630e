"""BADGE: batch active learning by diverse gradient embeddings (Ash, Zhang, Krishnamurthy, Langford,
Agarwal, "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds", ICLR 2020).

Each candidate is embedded by the gradient of the cross-entropy at its own predicted label with
respect to the last layer's weights: ``(p - onehot(argmax p)) ⊗ h(x)``, ``[C * D]``, where ``p``
is the softmax output and ``h`` the penultimate features. Its norm grows with uncertainty, its
direction says what the sample would change. k-means++ seeding over the embeddings then picks a
batch that is both uncertain and diverse.

:func:`badge_select` seeds over the factors ``r = p - onehot`` [M, C] and ``h`` [M, D] of a
gathered candidate set (:mod:`pipeline.acquisition.candidates`), never forming ``r ⊗ h``:
``||r_i ⊗ h_i - r_j ⊗ h_j||² = |r_i|²|h_i|² + |r_j|²|h_j|² - 2 (r_i·r_j)(h_i·h_j)``, so a
candidate costs ``C + D`` floats (the materialised embeddings would cost ``C x D``) and one
distance ``O(C + D)`` operations. The tests check it against brute force on materialised embeddings.

Cost of :func:`badge_select`: seeding is sequential, each pick needs the distance of every
candidate to the newest centre, so a plain implementation is ``O(k · M · (C + D))`` and reads the
``M x (C + D)`` embeddings k times (memory-bound: about ``k · M · (C + D) · 4 bytes / bandwidth``),
plus an ``O(M)`` draw per pick. Here rows are grouped by nearest centre and pruned exactly by the
triangle inequality (as in accelerated k-means++, Raff, "Exact Acceleration of K-Means++ and
K-Means||", IJCAI 2021): a row whose distance to its nearest centre ``a`` is at most half the
distance from ``a`` to the new centre cannot move closer, so a whole group is skipped when its
farthest row can't, and within the other groups a row is skipped by the same bound or when its norm
differs from the new centre's by at least its current distance. The draw picks a group by the
groups' cumulative weights, then a row in it. A pick then costs ``O(j (C + D))`` for the distances
between the new centre and the j earlier ones (``O(k² (C + D))`` over the run) plus the rows of the
groups it can change; how many that is depends on the data (clustered features prune well,
isotropic noise hardly): benchmarks/bench_selection.py measures it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["badge_select"]


def badge_select(residuals: np.ndarray | Tensor, features: np.ndarray | Tensor, k: int, seed: int) -> list[int]:
    """k-means++ seeding over the gradient embeddings ``residuals[i] ⊗ features[i]`` in factored form.

    The seeding of the authors' code (largest norm first, then each next centre drawn with
    probability proportional to its squared distance to the nearest centre), with the draw's
    inverse CDF laid over the rows grouped by nearest centre: one uniform per pick from
    ``numpy.random.default_rng(seed)`` picks a centre's group by the groups' cumulative weights,
    then a row within it (rows ascending). The distribution is the same; the grouping lets a pick
    touch only the groups the new centre can change (see the module doc) instead of all M rows.

    Args:
        residuals: ``[M, C]`` ``p - onehot(argmax p)`` (``pipeline.acquisition.prediction_residuals``).
        features: ``[M, D]`` penultimate features.
        k: Rows to pick; at most M are returned.
        seed: Seed of the draws.

    Returns:
        Row indices in pick order, without repeats. When every remaining row coincides with a
        centre (all distances 0), the rest are drawn uniformly.

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
    with _one_thread():
        return _seed(_FactoredSeeding(r, h, k), n, k, seed)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread for the duration: a pick is a few small products, whose hand-offs between
    threads cost more than they save, and stall when the machine's cores are busy (3x slower with
    two threads than with one at M = 20,000 on this two-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _seed(seeding: _FactoredSeeding, n: int, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    picks = [int(np.argmax(seeding.norms2))]
    seeding.add_centre(picks[0])
    chosen = np.zeros(n, dtype=bool)
    chosen[picks[0]] = True
    while len(picks) < k:
        index = seeding.draw(rng)
        if index is None or chosen[index]:  # every distance 0; or rounding at a zero-weight boundary
            index = int(rng.choice(np.flatnonzero(~chosen))) if index is None else seeding.heaviest_unchosen(chosen)
        picks.append(index)
        chosen[index] = True
        seeding.add_centre(index)
    return picks


class _FactoredSeeding:
    """Rows grouped by their nearest centre, with each row's squared distance to it.

    Rows live as factors (r [M, C], h [M, D]); centres as copies of their factors (``k x (C + D)``)
    for the centre-to-centre distances the bounds need. Per centre: its rows (ascending), the
    largest squared distance among them (``radius2``) and their sum (the group's draw weight).
    Products go through torch (BLAS); the bookkeeping stays in numpy.
    """

    def __init__(self, r: Tensor, h: Tensor, k: int) -> None:
        dtype = torch.float64 if torch.float64 in (r.dtype, h.dtype) else torch.float32
        self.r, self.h = r.to(dtype).contiguous(), h.to(dtype).contiguous()
        self.norms2 = (self.r * self.r).sum(1).numpy() * (self.h * self.h).sum(1).numpy()  # [M] |r ⊗ h|²
        self.norms = np.sqrt(self.norms2)
        self.nearest2 = np.zeros_like(self.norms2)
        self.assigned = np.zeros(r.shape[0], dtype=np.int64)
        self.members: list[np.ndarray] = []
        self.radius2 = np.zeros(k)
        self.weight = np.zeros(k)
        self.centre_r = torch.empty(k, r.shape[1], dtype=dtype)
        self.centre_h = torch.empty(k, h.shape[1], dtype=dtype)
        self.centre_norms2 = np.empty(k, dtype=self.norms2.dtype)
        self.recomputed = 0  # distances computed, over all centres (pruning diagnostics)

    def _distances2(self, rows: np.ndarray, centre: int) -> np.ndarray:
        r_c, h_c = self.r[centre], self.h[centre]
        if len(rows) * 3 > len(self.norms2):
            # Most rows are needed: one pass over the whole matrices beats gathering the rows.
            dots = ((self.r @ r_c) * (self.h @ h_c)).numpy()[rows]
        else:
            index = torch.from_numpy(rows)
            dots = ((self.r[index] @ r_c) * (self.h[index] @ h_c)).numpy()
        self.recomputed += len(rows)
        return np.maximum(self.norms2[rows] + self.norms2[centre] - 2.0 * dots, 0.0)

    def add_centre(self, centre: int) -> None:
        """Make row ``centre`` centre number ``len(self.members)``: rows closer to it move to its group."""
        j = len(self.members)
        if j == 0:
            rows = np.arange(len(self.norms2))
            self.nearest2 = self._distances2(rows, centre)
            self.members.append(rows)
        else:
            between = ((self.centre_r[:j] @ self.r[centre]) * (self.centre_h[:j] @ self.h[centre])).numpy()
            between = np.maximum(self.centre_norms2[:j] + self.norms2[centre] - 2.0 * between, 0.0)
            # Triangle bound: with a the nearest centre of x, d(x, c) >= d(a, c) - d(x, a), so x cannot
            # move closer when d(a, c)² >= 4 d(x, a)²; a whole group is skipped when that holds for its
            # farthest row. Norm bound per row: d(x, c) >= | |x| - |c| |.
            near = np.flatnonzero(between < 4.0 * self.radius2[:j])
            rows = np.concatenate([self.members[g] for g in near]) if len(near) else np.empty(0, np.int64)
            gap = self.norms[rows] - self.norms[centre]
            nearest2 = self.nearest2[rows]
            rows = rows[(between[self.assigned[rows]] < 4.0 * nearest2) & (gap * gap < nearest2)]
            distances = self._distances2(rows, centre)
            closer = distances < self.nearest2[rows]
            moved = rows[closer]
            self.nearest2[moved] = distances[closer]
            self.assigned[moved] = j
            touched = set(near.tolist())
            if self.assigned[centre] != j:  # a duplicate of an earlier centre, drawn uniformly: it moves too
                touched.add(int(self.assigned[centre]))
                self.assigned[centre] = j
                moved = np.append(moved, centre)
            for g in touched:
                kept = self.members[g][self.assigned[self.members[g]] == g]
                self.members[g] = kept
                self._summarise(g)
            self.members.append(np.sort(moved))
        self.nearest2[centre] = 0.0
        self.assigned[centre] = j
        self._summarise(j)
        self.centre_r[j], self.centre_h[j] = self.r[centre], self.h[centre]
        self.centre_norms2[j] = self.norms2[centre]

    def _summarise(self, group: int) -> None:
        distances = self.nearest2[self.members[group]]
        self.radius2[group] = distances.max() if len(distances) else 0.0
        self.weight[group] = distances.sum(dtype=np.float64)

    def draw(self, rng: np.random.Generator) -> int | None:
        """A row drawn with probability ∝ its squared distance, by one uniform; None when all are 0."""
        cumulative = np.cumsum(self.weight[: len(self.members)])
        total = cumulative[-1]
        if not total > 0:
            return None
        target = rng.random() * total
        group = min(int(np.searchsorted(cumulative, target, side="right")), len(cumulative) - 1)
        rows = self.members[group]
        within = np.cumsum(self.nearest2[rows], dtype=np.float64)
        offset = target - (cumulative[group - 1] if group else 0.0)
        return int(rows[min(int(np.searchsorted(within, offset, side="right")), len(rows) - 1)])

    def heaviest_unchosen(self, chosen: np.ndarray) -> int:
        """The unchosen row farthest from its centre (the fallback when a draw lands on a centre)."""
        open_rows = np.flatnonzero(~chosen)
        return int(open_rows[np.argmax(self.nearest2[open_rows])])
