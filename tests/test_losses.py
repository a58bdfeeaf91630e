"""Tests for pipeline.losses: LL4AL ranking loss and joint objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import joint_loss, loss_prediction_ranking_loss


def test_ranking_loss_hand_computed() -> None:
    pred = torch.tensor([0.5, 2.0, 1.0, 0.0], requires_grad=True)
    true = torch.tensor([3.0, 1.0, 2.0, 0.5])
    # Pairs (i, B-1-i): (0, 3) and (1, 2).
    # (0, 3): true 3.0 > 0.5 -> s = +1; pred diff 0.5 - 0.0 = 0.5; max(0, 1 - 0.5) = 0.5
    # (1, 2): true 1.0 < 2.0 -> s = -1; pred diff 2.0 - 1.0 = 1.0; max(0, 1 + 1.0) = 2.0
    # mean = (0.5 + 2.0) / 2 = 1.25
    loss = loss_prediction_ranking_loss(pred, true)
    assert loss.item() == pytest.approx(1.25)
    # Both hinges active: d/dpred = [-s0, -s1, +s1, +s0] / 2 = [-0.5, 0.5, -0.5, 0.5]
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([-0.5, 0.5, -0.5, 0.5])
    # margin 0.5: (0, 3) -> max(0, 0.5 - 0.5) = 0; (1, 2) -> 0.5 + 1.0 = 1.5; mean 0.75
    assert loss_prediction_ranking_loss(pred, true, margin=0.5).item() == pytest.approx(0.75)


def test_ties_count_as_negative_and_satisfied_pairs_are_free() -> None:
    # Tie: s = -1 (authors' 2*sign(clamp(0, min=0)) - 1); pred diff 0.3 -> 1 + 0.3 = 1.3
    tie = loss_prediction_ranking_loss(torch.tensor([0.3, 0.0]), torch.tensor([1.0, 1.0]))
    assert tie.item() == pytest.approx(1.3)
    # Correct order with a gap above the margin: max(0, 1 - 2) = 0
    ok = loss_prediction_ranking_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert ok.item() == 0.0


def test_matches_margin_ranking_loss_reference() -> None:
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(10, generator=g), torch.rand(10, generator=g)
    half = 5
    sign = torch.where(true[:half] > true.flip(0)[:half], 1.0, -1.0)
    ref = F.margin_ranking_loss(pred[:half], pred.flip(0)[:half], sign, margin=1.0)
    assert loss_prediction_ranking_loss(pred, true).item() == pytest.approx(ref.item())


def test_accepts_column_vectors() -> None:
    pred, true = torch.randn(6), torch.rand(6)
    a = loss_prediction_ranking_loss(pred, true)
    b = loss_prediction_ranking_loss(pred[:, None], true[:, None])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same batch size"):
        loss_prediction_ranking_loss(torch.randn(4), torch.randn(5))
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        loss_prediction_ranking_loss(torch.randn(4, 2), torch.randn(4))


def test_odd_batch_drops_middle_sample() -> None:
    pred = torch.tensor([0.1, 0.7, 5.0, 0.2, 0.4])
    true = torch.tensor([1.0, 2.0, 9.0, 0.5, 3.0])
    base = loss_prediction_ranking_loss(pred, true)
    pred2, true2 = pred.clone(), true.clone()
    pred2[2], true2[2] = -7.0, 0.0  # middle sample (index 2) is unpaired
    assert torch.equal(loss_prediction_ranking_loss(pred2, true2), base)
    # Same as the even batch without it: pairs (0, 4) and (1, 3).
    keep = [0, 1, 3, 4]
    assert torch.equal(loss_prediction_ranking_loss(pred[keep], true[keep]), base)


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batch_gives_zero_with_working_backward(batch: int) -> None:
    pred = torch.randn(batch, requires_grad=True)
    loss = loss_prediction_ranking_loss(pred, torch.rand(batch))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_target_is_detached() -> None:
    pred = torch.randn(4, requires_grad=True)
    true = torch.rand(4, requires_grad=True)
    loss = loss_prediction_ranking_loss(pred, true)
    grad_pred, grad_true = torch.autograd.grad(loss, [pred, true], allow_unused=True)
    assert grad_true is None
    assert grad_pred is not None


def test_joint_loss_parts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    targets = torch.randint(0, 5, (6,))
    pred = torch.randn(6, requires_grad=True)
    out = joint_loss(logits, targets, pred, lam=0.5, margin=1.0)
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(out.per_sample_ce, per_sample)
    assert torch.allclose(out.ce, per_sample.mean())
    assert torch.allclose(out.ranking, loss_prediction_ranking_loss(pred, per_sample))
    assert torch.allclose(out.total, out.ce + 0.5 * out.ranking)
    # The ranking term reaches the logits only through nothing: its target is detached.
    (grad_logits,) = torch.autograd.grad(out.ranking, [logits], allow_unused=True)
    assert grad_logits is None
