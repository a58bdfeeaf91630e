"""Cluster-Margin (Citovsky, DeSalvo, Gentile, Karydas, Rajagopalan, Rostamizadeh, Kumar, "Batch
Active Learning at Scale", NeurIPS 2021): the smallest-margin candidates, clustered, then picked
round-robin over the clusters from the smallest one, so a large batch cannot fill up with near-copies
of one hard case.

The paper clusters the whole pool once, before the first round, with average-linkage hierarchical
agglomerative clustering (HAC) on the penultimate features, then each round takes the k_m
smallest-margin rows, groups them by their HAC cluster, sorts the groups by size (smallest first)
and visits them in turn, drawing one random member from each, until k are picked.

Where this departs from the paper, and why:

- Clustering: k-means (Lloyd, :func:`kmeans_labels`) on the candidates' penultimate features, redone
  every query, instead of HAC over the whole pool once. HAC needs the pairwise distances of the pool
  (O(N²)), which does not fit a pool of millions here, and a query has no earlier clustering to
  reuse (each nightly checkpoint has new features). k-means groups by distance to a centre, so its
  clusters are rounder than average-linkage ones and their count is a setting, not a threshold.
- The clusters group the M candidates only (``clusters`` of them), not the pool: the round-robin
  order (smallest first) is therefore by the candidates' cluster sizes, as in the paper's
  restriction of the pool clusters to the margin candidates.
- k-means starts from k-means++ seeding on a sample of the candidates and runs a fixed number of
  Lloyd rounds (20): a local optimum, which HAC does not have to settle for, but it is reproducible.
- Within a cluster the paper draws at random; here the order within each cluster is a seeded hash
  of the key (``key_uniforms``), the same random draw made reproducible and independent of arrival
  order.

Deterministic given the seed: the candidates come in canonical order (margin, key), k-means seeds
from a ``numpy.random.default_rng(seed)`` and ties between equal-sized clusters go to
the cluster holding the smaller-margin candidate first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from pipeline._keyhash import key_uniforms
from pipeline.acquisition.badge import badge_select

__all__ = ["cluster_margin_select", "default_clusters", "kmeans_labels"]


def default_clusters(k: int, candidates: int) -> int:
    """Clusters when none is set: ``ceil(k / 10)``, at most the candidates. Ten picks per cluster on
    average is a starting point, not a tuned value: the paper sets a HAC distance threshold instead."""
    return max(1, min(candidates, math.ceil(k / 10)))


def kmeans_labels(
    features: np.ndarray | Tensor, clusters: int, seed: int, iterations: int = 20, init_sample: int = 20
) -> np.ndarray:
    """Lloyd's k-means on the rows of ``features``; returns each row's cluster.

    Starts from k-means++ seeding (D² sampling, :func:`~pipeline.acquisition.badge.badge_select` with
    unit residuals) over a seeded sample of ``init_sample x clusters`` rows: plain random starts
    merge well-separated groups, and seeding over every row would cost as much as the whole run
    for many clusters. A cluster that empties keeps its centre. Distances are ``|x|² - 2 x·c + |c|²``
    by matrix products in row blocks (memory ``block x clusters``). Stops early when no label changes.

    Args:
        features: ``[M, D]``.
        clusters: Number of clusters (at most M).
        seed: Seed of the initial centres.
        iterations: At most this many assignment-update rounds.
        init_sample: Rows per cluster the seeding draws its centres from.

    Returns:
        int64 ``[M]`` labels in ``[0, clusters)``.
    """
    x = torch.as_tensor(features).float()
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, init_sample * clusters), replace=False))
    seeds = badge_select(np.ones((len(sample), 1), np.float32), x[torch.from_numpy(sample)], clusters, seed)
    centres = x[torch.from_numpy(sample[seeds])].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    x2 = (x * x).sum(1)
    for _ in range(iterations):
        new = _nearest_centre(x, x2, centres)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=clusters)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    return labels.numpy()


def _nearest_centre(x: Tensor, x2: Tensor, centres: Tensor, block: int = 8192) -> Tensor:
    c2 = (centres * centres).sum(1)
    # One distance buffer for every block, not a fresh [block, clusters] tensor per block: in a
    # long-running driver glibc has raised its mmap threshold (to 32 MiB), so each fresh 30 MiB
    # block came from the heap and fragmented it; a 100k-candidate pick's peak RSS grew by ~420 MiB.
    distances = torch.empty(min(block, x.shape[0]), centres.shape[0], dtype=x.dtype)
    labels = torch.empty(x.shape[0], dtype=torch.long)
    for start in range(0, x.shape[0], block):
        rows = x[start : start + block]
        part = distances[: rows.shape[0]]
        torch.add(x2[start : start + block, None], c2[None, :], out=part)
        labels[start : start + rows.shape[0]] = part.addmm_(rows, centres.T, alpha=-2.0).argmin(1)
    return labels


def cluster_margin_select(labels: np.ndarray, keys: list[str], k: int, seed: int) -> list[int]:
    """Round-robin over clusters, smallest first, a seeded random member of each per turn.

    Args:
        labels: ``[M]`` cluster of each candidate, candidates in canonical order (margin, key).
        keys: ``[M]`` their keys (seed the order within each cluster).
        k: Rows to pick; at most M are returned.
        seed: Seed of the order within clusters.

    Returns:
        Candidate indices in pick order: turn 1 visits every cluster (smallest first), turn 2 every
        cluster with a second member, and so on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} cluster labels")
    if n == 0 or k <= 0:
        return []
    _, cluster, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    # Cluster visiting order: size ascending, then the cluster's first candidate (its smallest margin).
    first = np.full(len(sizes), n, dtype=np.int64)
    np.minimum.at(first, cluster, np.arange(n))
    position = np.empty(len(sizes), dtype=np.int64)
    position[np.lexsort((first, sizes))] = np.arange(len(sizes))
    # Turn of each candidate within its cluster: its rank by the seeded per-key draw.
    draw = key_uniforms(keys, seed, "lplgrad.cmargin")
    by_draw = np.lexsort((draw, cluster))
    turn = np.empty(n, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(np.bincount(cluster[by_draw]))[:-1]])
    turn[by_draw] = np.arange(n) - np.repeat(starts, np.bincount(cluster[by_draw]))
    order = np.lexsort((position[cluster], turn))
    return order[: min(k, n)].tolist()
