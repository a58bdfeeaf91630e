"""Core-set selection (Sener & Savarese, "Active Learning for Convolutional Neural Networks: A
Core-Set Approach", ICLR 2018): k-center greedy on penultimate-layer features.

Unlike the per-sample strategies in `pipeline.acquisition`, core-set is a set function: each pick
depends on the previous ones, so it runs on features gathered in one place (the simulation
driver), not merged from independent batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FeatureRows", "kcenter_greedy", "penultimate_features"]


def penultimate_features(model: nn.Module, inputs: Tensor, head: str | None = None) -> Tensor:
    """Inputs of the classifier head for a batch, in eval mode, without gradients.

    Args:
        model: the classifier.
        inputs: [B, ...] batch.
        head: name of the final layer (default: the last nn.Linear in the model).

    Returns:
        [B, D] features (flattened head inputs).

    Raises:
        ValueError: no such layer, or the model has no Linear head.
    """
    modules = dict(model.named_modules())
    if head is None:
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear head; name the final layer with head=")
        head = linears[-1]
    if head not in modules:
        raise ValueError(f"no layer named {head!r} in {type(model).__name__}")
    captured: list[Tensor] = []
    handle = modules[head].register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[-1].flatten(1)


def kcenter_greedy(unlabeled: Tensor, labeled: Tensor, k: int, chunk: int = 4096) -> list[int]:
    """Pick k unlabeled points, each the farthest (Euclidean) from all labeled and picked ones.

    Args:
        unlabeled: [N, D] candidate features.
        labeled: [M, D] features of the labeled set (M may be 0).
        k: number of picks; at most N are returned.
        chunk: rows per distance block, bounding memory at chunk x N.

    Returns:
        Indices into `unlabeled`, in pick order. Ties go to the lowest index.
    """
    n = unlabeled.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    unlabeled = unlabeled.double()
    nearest = torch.full((n,), float("inf"), dtype=torch.float64)
    for start in range(0, labeled.shape[0], chunk):
        block = torch.cdist(unlabeled, labeled[start : start + chunk].double())
        nearest = torch.minimum(nearest, block.min(dim=1).values)
    picks: list[int] = []
    if labeled.shape[0] == 0:
        picks.append(0)  # no centres yet: start from the first candidate, deterministically
        nearest = torch.cdist(unlabeled, unlabeled[:1]).squeeze(1)
        nearest[0] = -1.0
    while len(picks) < k:
        index = int(torch.argmax(nearest))
        picks.append(index)
        nearest = torch.minimum(nearest, torch.cdist(unlabeled, unlabeled[index : index + 1]).squeeze(1))
        nearest[index] = -1.0  # never picked twice
    return picks


class FeatureRows:
    """Batch-in, rows-out penultimate features: the callable a Ray Data actor pool runs.

    Args:
        build: returns (model, ...) like RowScorer's; called once, in the actor.
    """

    def __init__(self, build: Callable[[], tuple[Any, ...]]) -> None:
        self.model = build()[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e is None for e in batch["error"]], dtype=bool)
        images = np.ascontiguousarray(np.asarray(batch["image"])[ok])
        features = penultimate_features(self.model, torch.from_numpy(images.copy()).float()).numpy()
        return {"key": np.asarray(batch["key"])[ok], "features": features}
