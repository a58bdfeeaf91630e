"""Joint training of a backbone and its LossNet, as in LL4AL (Yoo & Kweon, CVPR 2019).

Paper schedule (CIFAR-10): 200 epochs, SGD lr 0.1 momentum 0.9 weight decay 5e-4, lr x0.1
after epoch 160, lambda = 1, margin = 1. After epoch 120 the features fed to the LossNet are
detached, so the ranking loss stops shaping the backbone once it has fitted the data
(Sec. 4.1: otherwise the loss-prediction gradient hurts the target task late in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from pipeline.losses import JointLoss, joint_loss
from pipeline.lossnet import LossNet
from pipeline.models.feature_tap import FeatureTap

__all__ = [
    "TrainSchedule",
    "detach_features",
    "joint_forward",
    "unwrap",
    "joint_train_step",
    "make_optimizers",
]


@dataclass(frozen=True)
class TrainSchedule:
    """Optimisation schedule of one active-learning cycle (defaults: the paper's CIFAR-10).

    Attributes:
        epochs: Training epochs per cycle.
        epoch_loss: First epoch (0-based) at which LossNet inputs are detached.
        lr: SGD learning rate, shared by backbone and LossNet.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        milestones: Epochs at which the learning rate is multiplied by ``gamma``.
        gamma: Learning-rate decay factor.
        lam: Weight of the ranking loss.
        margin: Ranking loss margin.

    Raises:
        ValueError: On out-of-range values (checked at construction).
    """

    epochs: int = 200
    epoch_loss: int = 120
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (160,)
    gamma: float = 0.1
    lam: float = 1.0
    margin: float = 1.0

    def __post_init__(self) -> None:
        # YAML gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        problems = []
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.epoch_loss <= self.epochs:
            problems.append(f"epoch_loss must be in [0, epochs={self.epochs}], got {self.epoch_loss}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        in_range = all(0 < m <= self.epochs for m in self.milestones)
        increasing = list(self.milestones) == sorted(set(self.milestones))
        if not (in_range and increasing):
            problems.append(
                f"milestones must be strictly increasing epochs in (0, epochs={self.epochs}], got {self.milestones}"
            )
        if self.gamma <= 0:
            problems.append(f"gamma must be > 0, got {self.gamma}")
        if self.lam < 0:
            problems.append(f"lam must be >= 0, got {self.lam}")
        if self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        if problems:
            raise ValueError("invalid TrainSchedule: " + "; ".join(problems))

    @classmethod
    def scaled(cls, epochs: int) -> TrainSchedule:
        """The paper's schedule shrunk to ``epochs``, keeping its fractions.

        Detaching starts at 60% of training (120/200), the lr drop at 80% (160/200).

        Args:
            epochs: Training epochs per cycle.

        Returns:
            A schedule with ``epoch_loss = round(0.6 * epochs)`` and
            ``milestones = (round(0.8 * epochs),)``; other fields at their defaults.

        Raises:
            ValueError: If ``epochs`` is not positive.
        """
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        return cls(epochs=epochs, epoch_loss=round(0.6 * epochs), milestones=(round(0.8 * epochs),))


def detach_features(epoch: int, schedule: TrainSchedule) -> bool:
    """Whether LossNet inputs are detached from the backbone at ``epoch`` (0-based)."""
    return epoch >= schedule.epoch_loss


def make_optimizers(model: nn.Module, lossnet: LossNet, schedule: TrainSchedule) -> tuple[Optimizer, LRScheduler]:
    """One SGD over backbone and LossNet (one param group each) with a MultiStepLR.

    The paper uses two optimisers with identical settings; one with two groups is the same
    update and a single ``step()`` call.

    Args:
        model: The backbone.
        lossnet: Its loss prediction module.
        schedule: Learning-rate, momentum, weight decay and milestones.

    Returns:
        ``(optimizer, lr_scheduler)``; call ``lr_scheduler.step()`` once per epoch.
    """
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad]},
        {"params": [p for p in lossnet.parameters() if p.requires_grad]},
    ]
    optimizer = SGD(groups, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    lr_scheduler = MultiStepLR(optimizer, milestones=list(schedule.milestones), gamma=schedule.gamma)
    return optimizer, lr_scheduler


def joint_forward(
    model: nn.Module,
    lossnet: nn.Module,
    tap: FeatureTap,
    x: Tensor,
    y: Tensor,
    schedule: TrainSchedule,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, JointLoss]:
    """Forward backbone and LossNet and compute the joint loss, without stepping.

    Args:
        model: The backbone ``tap`` hooks, or a wrapper of it (DDP): the forward goes through
            ``model`` so that a wrapper sees it.
        lossnet: The loss prediction module (possibly DDP-wrapped).
        tap: Feature tap on the backbone.
        x: Inputs ``[B, C, H, W]`` on the model's device.
        y: Class indices ``[B]``.
        schedule: Supplies ``epoch_loss``, ``lam`` and ``margin``.
        epoch: Current epoch, 0-based.
        amp_dtype: autocast dtype (bf16 on GPU) or None for full precision. Losses are
            computed in fp32 either way.

    Returns:
        ``(logits [B, num_classes], JointLoss)``.

    Raises:
        ValueError: If ``tap`` hooks a different module than ``model``.
    """
    if tap.model is not unwrap(model):
        raise ValueError("tap must hook the model being trained (FeatureTap(model))")
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        with tap.capture() as feats:
            logits = model(x)
        if detach_features(epoch, schedule):
            # Gradient of the ranking loss stops at the LossNet; the backbone sees CE only.
            feats = [f.detach() for f in feats]
        pred_loss = lossnet(list(feats))
    return logits, joint_loss(logits.float(), y, pred_loss.float(), lam=schedule.lam, margin=schedule.margin)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    return module.module if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else module


def joint_train_step(
    model: nn.Module,
    lossnet: LossNet,
    tap: FeatureTap,
    x: Tensor,
    y: Tensor,
    optimizer: Optimizer,
    schedule: TrainSchedule,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One SGD step on ``CE + lam * ranking`` for backbone and LossNet together.

    Args:
        model: The backbone (must be the module ``tap`` hooks).
        lossnet: The loss prediction module.
        tap: Feature tap on ``model``.
        x: Inputs ``[B, C, H, W]`` on the model's device.
        y: Class indices ``[B]``.
        optimizer: Optimiser over both modules (see :func:`make_optimizers`).
        schedule: Supplies ``epoch_loss``, ``lam`` and ``margin``.
        epoch: Current epoch, 0-based.
        amp_dtype: autocast dtype or None (see :func:`joint_forward`).

    Returns:
        ``{"loss", "ce", "ranking", "accuracy"}`` as Python floats, measured before the step.
    """
    model.train()
    lossnet.train()
    logits, loss = joint_forward(model, lossnet, tap, x, y, schedule, epoch, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    optimizer.step()
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == y).float().mean()
    return {
        "loss": loss.total.item(),
        "ce": loss.ce.item(),
        "ranking": loss.ranking.item(),
        "accuracy": accuracy.item(),
    }
