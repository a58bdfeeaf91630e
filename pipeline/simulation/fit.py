"""Joint training and evaluation on arrays in one process: the per-worker loop of
`ray_jobs._shared.training.fit` without Ray, for simulations (same model, LossNet, schedule, joint step and
augmentation; one worker, so no gradient all-reduce).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.augment import BatchAugment, augment_generator
from pipeline.checkpoint import ModelSpec
from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap
from pipeline.training import TrainSchedule, joint_train_step, make_optimizers

__all__ = ["NetworkWeights", "TrainedModel", "evaluate", "train_in_memory"]


# eq=False: comparing state dicts of tensors with `==` is ambiguous, so identity is the equality.
@dataclass(frozen=True, eq=False)
class NetworkWeights:
    """State dicts of a model and its LossNet, kept apart from the modules (a warm start, or a
    first cycle shared by the chains of one seed)."""

    model_state: dict[str, torch.Tensor]
    lossnet_state: dict[str, torch.Tensor]

    def load_into(self, model: nn.Module, lossnet: LossNet) -> None:
        model.load_state_dict(self.model_state)
        lossnet.load_state_dict(self.lossnet_state)


@dataclass
class TrainedModel:
    """A model of one cycle, with what querying it needs and its last epoch's figures."""

    model: nn.Module
    lossnet: LossNet
    tap: FeatureTap
    train_accuracy: float
    seconds: float

    def state(self) -> NetworkWeights:
        """Copies of both state dicts (for a warm start or a shared first cycle)."""
        return NetworkWeights(_copy(self.model.state_dict()), _copy(self.lossnet.state_dict()))


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}


def train_in_memory(
    spec: ModelSpec,
    images: np.ndarray,
    labels: np.ndarray,
    schedule: TrainSchedule,
    *,
    batch_size: int,
    seed: int,
    augment: BatchAugment | None = None,
    warm_start: NetworkWeights | None = None,
    device: torch.device | str = "cpu",
) -> TrainedModel:
    """Train a fresh (or warm-started) model and LossNet jointly on the given samples.

    Args:
        spec: What to build.
        images: float32 [N, C, H, W], normalised.
        labels: int64 [N].
        schedule: Epochs, detach epoch, learning rates (as `lplgrad train`).
        batch_size: Samples per step; a last batch of one sample is skipped (the ranking loss
            compares pairs, and BatchNorm cannot normalise one sample).
        seed: Seeds the initial weights, each epoch's order and its augmentation.
        augment: Applied to training batches only.
        warm_start: ``TrainedModel.state()`` of the previous cycle: weights kept, optimiser
            fresh, as the authors' code keeps the model across cycles.
        device: Where to train.

    Returns:
        The trained :class:`TrainedModel`, left in eval mode.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, lossnet, tap = spec.build()
    if warm_start is not None:
        warm_start.load_into(model, lossnet)
    model.to(device)
    lossnet.to(device)
    optimizer, lr_scheduler = make_optimizers(model, lossnet, schedule)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    correct = seen = 0.0
    for epoch in range(schedule.epochs):
        generator = augment_generator(seed, 0, epoch)
        order = torch.randperm(len(y_all), generator=generator)
        correct = seen = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            x, y = x_all[index].to(device), y_all[index].to(device)
            if augment is not None:
                x = augment(x, generator)
            step = joint_train_step(model, lossnet, tap, x, y, optimizer, schedule, epoch)
            correct += step["accuracy"] * len(index)
            seen += len(index)
        lr_scheduler.step()
    model.eval()
    lossnet.eval()
    return TrainedModel(model, lossnet, tap, correct / max(seen, 1.0), time.perf_counter() - started)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1024) -> float:
    """Accuracy of ``model`` (eval mode, never augmented) on the given samples."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            predicted = model(x).argmax(1).cpu().numpy()
            correct += int((predicted == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)
