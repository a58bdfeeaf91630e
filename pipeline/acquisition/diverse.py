"""Diverse strategies by name: set functions that pick k rows from a gathered candidate set
(:class:`~pipeline.acquisition.candidates.Candidates`, the M smallest-margin rows with their
embeddings), for batches too large for per-sample top-k, which fills them with near-copies.

- ``badge``: k-means++ seeding over the last-layer gradient embeddings (Ash et al., ICLR 2020),
  in factored form (:func:`~pipeline.acquisition.badge.badge_select`).
- ``cluster-margin``: k-means on the penultimate features, round-robin over clusters from the
  smallest (after Citovsky et al., NeurIPS 2021; :mod:`pipeline.acquisition.cluster_margin`).

The query and the simulation both call :func:`select_diverse` on the same candidate set, so the
two select alike given the same scores and embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pipeline.acquisition.badge import badge_select
from pipeline.acquisition.candidates import Candidates
from pipeline.acquisition.cluster_margin import cluster_margin_select, default_clusters, kmeans_labels

__all__ = ["DIVERSE_STRATEGIES", "DiverseStrategy", "register_diverse", "select_diverse"]


@dataclass(frozen=True)
class DiverseStrategy:
    """One registered diverse strategy.

    Attributes:
        name: Registry name, as used in configs.
        select: ``(candidates, k, seed, clusters) -> candidate indices in pick order``; ``clusters``
            is ``None`` for strategies without a clustering.
        method: What the manifest records beside the name: the algorithm in a line.
        clustered: Whether it reads ``clusters``.
    """

    name: str
    select: Callable[[Candidates, int, int, int | None], list[int]]
    method: str
    clustered: bool


_REGISTRY: dict[str, DiverseStrategy] = {}
DIVERSE_STRATEGIES: Mapping[str, DiverseStrategy] = MappingProxyType(_REGISTRY)


def register_diverse(
    name: str, method: str, clustered: bool = False
) -> Callable[[Callable[[Candidates, int, int, int | None], list[int]]], Callable]:
    """Decorator registering ``select(candidates, k, seed, clusters)`` under ``name``.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorate(select: Callable[[Candidates, int, int, int | None], list[int]]) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"diverse strategy {name!r} is already registered")
        _REGISTRY[name] = DiverseStrategy(name, select, method, clustered)
        return select

    return decorate


@register_diverse("badge", "k-means++ seeding on factored gradient embeddings of the smallest-margin candidates")
def _badge(candidates: Candidates, k: int, seed: int, clusters: int | None) -> list[int]:
    return badge_select(candidates.residuals, candidates.features, k, seed)


@register_diverse(
    "cluster-margin",
    "k-means on penultimate features of the smallest-margin candidates, round-robin from the smallest cluster",
    clustered=True,
)
def _cluster_margin(candidates: Candidates, k: int, seed: int, clusters: int | None) -> list[int]:
    if not len(candidates):
        return []
    count = clusters if clusters is not None else default_clusters(k, len(candidates))
    labels = kmeans_labels(candidates.features, count, seed)
    return cluster_margin_select(labels, candidates.keys, k, seed)


def select_diverse(name: str, candidates: Candidates, k: int, seed: int, clusters: int | None = None) -> list[int]:
    """Indices into ``candidates`` that strategy ``name`` picks, in pick order (at most k).

    Args:
        name: A key of :data:`DIVERSE_STRATEGIES`.
        candidates: The gathered candidate set, in its canonical order.
        k: Batch size.
        seed: Seed of the strategy's draws.
        clusters: Clusters of a clustered strategy (default :func:`default_clusters`); ignored otherwise.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown diverse strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].select(candidates, k, seed, clusters)
