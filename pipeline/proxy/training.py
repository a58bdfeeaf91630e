"""Training a proxy head on cached features with the joint LPLgrad objective, and the linear
probe that LP-FT hands to fine-tuning.

The head trains on [N, D] feature rows, so one process does it in seconds where a backbone
needs a Ray Train job: mean cross-entropy + lam * ranking loss between the LossNet's
predictions (on the head's hidden features) and the true per-sample losses, with the LossNet's
inputs detached after `epoch_loss`, exactly as `pipeline.training.joint_train_step` does for a
backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.checkpoint import Checkpoint, save_checkpoint
from pipeline.lossnet import LossNet
from pipeline.proxy.head import ProxyHead, ProxySpec
from pipeline.training import TrainSchedule, joint_train_step, make_optimizers

__all__ = ["ProxyTraining", "proxy_accuracy", "save_proxy_checkpoint", "train_proxy"]


@dataclass(frozen=True)
class ProxyTraining:
    """Optimisation of a proxy head (the paper's fractions: detach at 60%, lr drop at 80%)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(
                "epochs must be positive, batch_size at least 2 (the ranking loss needs pairs) and lr positive; got "
                f"{self}"
            )

    def schedule(self) -> TrainSchedule:
        return TrainSchedule(
            epochs=self.epochs,
            epoch_loss=round(0.6 * self.epochs),
            lr=self.lr,
            weight_decay=self.weight_decay,
            milestones=(max(1, round(0.8 * self.epochs)),),
        )


def train_proxy(
    features: np.ndarray | Tensor,
    labels: Sequence[int] | np.ndarray | Tensor,
    spec: ProxySpec,
    training: ProxyTraining = ProxyTraining(),
) -> tuple[ProxyHead, LossNet, list[dict[str, float]]]:
    """Train a fresh head and LossNet on labeled feature rows.

    Args:
        features: [N, D] cached features of the labeled samples.
        labels: [N] class indices.
        spec: head kind and sizes (spec.in_features must be D).
        training: epochs, batch size, learning rate, seed.

    Returns:
        (head, lossnet, per-epoch metrics {"epoch", "loss", "ce", "ranking", "accuracy"}), in eval mode.

    Raises:
        ValueError: shapes disagree, too few rows, or labels outside [0, num_classes).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.dim() != 2 or x.shape[1] != spec.in_features or len(y) != len(x):
        raise ValueError(
            f"expected features [N, {spec.in_features}] and labels [N], got {list(x.shape)} and {list(y.shape)}"
        )
    if len(x) < 2:
        raise ValueError(f"a proxy needs at least 2 labeled samples, got {len(x)}")
    if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
        raise ValueError(f"labels must be in [0, {spec.num_classes}), got [{int(y.min())}, {int(y.max())}]")
    torch.manual_seed(training.seed)
    head, lossnet, tap = spec.build()
    head.standardize_with(x)
    schedule = training.schedule()
    optimizer, lr_scheduler = make_optimizers(head, lossnet, schedule)
    order = torch.Generator().manual_seed(training.seed)
    history = []
    for epoch in range(training.epochs):
        sums = np.zeros(4)
        permutation = torch.randperm(len(x), generator=order)
        # Drop a last batch of one: the ranking loss needs a pair.
        batches = [b for b in permutation.split(training.batch_size) if len(b) > 1]
        for batch in batches:
            step = joint_train_step(head, lossnet, tap, x[batch], y[batch], optimizer, schedule, epoch)
            sums += np.array([step["loss"], step["ce"], step["ranking"], step["accuracy"]]) * len(batch)
        lr_scheduler.step()
        seen = sum(len(b) for b in batches)
        history.append({"epoch": epoch, **dict(zip(("loss", "ce", "ranking", "accuracy"), (sums / seen).tolist()))})
    tap.remove()
    return head.eval(), lossnet.eval(), history


def proxy_accuracy(head: nn.Module, features: np.ndarray | Tensor, labels: Sequence[int] | np.ndarray) -> float:
    """Top-1 accuracy of a head on feature rows (eval mode, no gradients)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    head.eval()
    with torch.no_grad():
        predictions = torch.cat([head(chunk).argmax(dim=1) for chunk in x.split(4096)]) if len(x) else y
    return float((predictions == y).float().mean()) if len(y) else float("nan")


def save_proxy_checkpoint(
    directory: str | Path,
    head: ProxyHead,
    lossnet: LossNet,
    spec: ProxySpec,
    classes: Sequence[str],
    metrics: Sequence[dict[str, Any]] = (),
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a proxy checkpoint (its `ProxySpec` marks it as one) where `load_checkpoint` reads it."""
    return save_checkpoint(
        directory,
        Checkpoint(
            head.state_dict(),
            lossnet.state_dict(),
            spec,
            tuple(classes),
            epoch=len(metrics) - 1,
            config=dict(config or {}),
            metrics=tuple(metrics),
        ),
    )
