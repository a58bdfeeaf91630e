"""Tests for pipeline.training: schedule, optimisers, joint training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap, create_model
from pipeline.training import (
    TrainSchedule,
    detach_features,
    joint_forward,
    joint_train_step,
    make_optimizers,
)

Setup = tuple[torch.nn.Module, LossNet, FeatureTap, torch.Tensor, torch.Tensor]


def _setup(seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10)
    lossnet = LossNet.for_model(model)
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    return model, lossnet, FeatureTap(model), x, y


def test_joint_steps_lower_both_losses() -> None:
    model, lossnet, tap, x, y = _setup()
    schedule = TrainSchedule.scaled(10)
    optimizer, _ = make_optimizers(model, lossnet, schedule)
    history = [joint_train_step(model, lossnet, tap, x, y, optimizer, schedule, epoch=0) for _ in range(20)]
    assert set(history[0]) == {"loss", "ce", "ranking", "accuracy"}
    assert all(isinstance(v, float) for v in history[0].values())
    assert history[-1]["ce"] < 0.7 * history[0]["ce"]
    # The ranking target moves as CE falls, so compare against the tail's mean.
    tail = sum(h["ranking"] for h in history[-5:]) / 5
    assert tail < 0.8 * history[0]["ranking"]
    assert history[-1]["accuracy"] > history[0]["accuracy"]


def _ranking_grads(epoch: int, schedule: TrainSchedule) -> tuple[list, list]:
    model, lossnet, tap, x, y = _setup()
    model.train()
    _, loss = joint_forward(model, lossnet, tap, x, y, schedule, epoch)
    backbone = list(model.parameters())
    head = list(lossnet.parameters())
    grads = torch.autograd.grad(loss.ranking, backbone + head, allow_unused=True)
    return list(grads[: len(backbone)]), list(grads[len(backbone) :])


def test_ranking_loss_stops_at_lossnet_after_epoch_loss() -> None:
    schedule = TrainSchedule.scaled(10)  # epoch_loss = 6
    before_backbone, before_head = _ranking_grads(schedule.epoch_loss - 1, schedule)
    after_backbone, after_head = _ranking_grads(schedule.epoch_loss, schedule)

    assert any(g is not None and g.abs().sum() > 0 for g in before_backbone)
    assert all(g is None or torch.all(g == 0) for g in after_backbone)
    # The LossNet itself keeps learning in both phases.
    assert all(g is not None for g in before_head + after_head)
    assert any(g.abs().sum() > 0 for g in after_head)


def test_step_after_epoch_loss_trains_backbone_on_ce_only() -> None:
    # lam = 0 removes the ranking term entirely; after epoch_loss the backbone update must
    # be the same as with lam = 1, since the ranking gradient no longer reaches it.
    schedule = TrainSchedule.scaled(10)
    updates = []
    for lam in (1.0, 0.0):
        model, lossnet, tap, x, y = _setup()
        s = dataclasses.replace(schedule, lam=lam)
        optimizer, _ = make_optimizers(model, lossnet, s)
        joint_train_step(model, lossnet, tap, x, y, optimizer, s, epoch=schedule.epoch_loss)
        updates.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*updates):
        assert torch.allclose(a, b)


def test_detach_features_boundary() -> None:
    schedule = TrainSchedule(epochs=10, epoch_loss=6, milestones=(8,))
    assert not detach_features(5, schedule)
    assert detach_features(6, schedule)


def test_scaled_keeps_paper_fractions() -> None:
    s = TrainSchedule.scaled(10)
    assert (s.epochs, s.epoch_loss, s.milestones) == (10, 6, (8,))
    paper = TrainSchedule.scaled(200)
    assert paper == TrainSchedule()
    assert (paper.epoch_loss, paper.milestones) == (120, (160,))
    assert TrainSchedule.scaled(1).epochs == 1


def test_make_optimizers() -> None:
    model, lossnet, _, _, _ = _setup()
    schedule = TrainSchedule.scaled(10)
    optimizer, lr_scheduler = make_optimizers(model, lossnet, schedule)
    n_params = sum(1 for _ in model.parameters()) + sum(1 for _ in lossnet.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params
    g = optimizer.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.1, 0.9, 5e-4)
    for _ in range(8):
        optimizer.step()
        lr_scheduler.step()
    assert all(g["lr"] == pytest.approx(0.01) for g in optimizer.param_groups)


def test_tap_must_hook_the_trained_model() -> None:
    model, lossnet, _, x, y = _setup()
    other_tap = FeatureTap(create_model("small_cnn", 10))
    with pytest.raises(ValueError, match="tap must hook"):
        joint_forward(model, lossnet, other_tap, x, y, TrainSchedule(), epoch=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be > 0"),
        ("epoch_loss", 201, "epoch_loss must be in"),
        ("epoch_loss", -1, "epoch_loss must be in"),
        ("lr", 0.0, "lr must be > 0"),
        ("momentum", 1.0, "momentum"),
        ("weight_decay", -1e-4, "weight_decay"),
        ("milestones", (160, 100), "milestones"),
        ("milestones", (250,), "milestones"),
        ("gamma", 0.0, "gamma"),
        ("lam", -1.0, "lam"),
        ("margin", -0.1, "margin"),
    ],
)
def test_bad_schedule_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSchedule(**{field: value})


def test_schedule_from_yaml_lists() -> None:
    s = TrainSchedule(milestones=[100, 150])  # type: ignore[arg-type]
    assert s.milestones == (100, 150)
    hash(s)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        TrainSchedule.scaled(0)
