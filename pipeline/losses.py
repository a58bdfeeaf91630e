"""Training losses of "Learning Loss for Active Learning" (Yoo & Kweon, CVPR 2019).

The loss prediction module is trained with a pairwise margin ranking loss (paper Eq. 2):
only the ORDER of two samples' true losses is supervised, so the predictor is not dragged
around by the shrinking scale of the target loss during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["JointLoss", "joint_loss", "loss_prediction_ranking_loss"]


def _as_vector(t: Tensor, name: str) -> Tensor:
    # Accept [B] or [B, 1] (a Linear(.., 1) head's raw output).
    if t.dim() == 2 and t.shape[1] == 1:
        return t.squeeze(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B] or [B, 1], got {list(t.shape)}")
    return t


def loss_prediction_ranking_loss(pred_loss: Tensor, true_loss: Tensor, margin: float = 1.0) -> Tensor:
    """Pairwise margin ranking loss between predicted and true per-sample losses.

    Sample ``i`` is paired with ``B-1-i`` for ``i < B // 2`` (the authors' split of a batch
    into halves by flipping); with an odd batch the middle sample is left unpaired. For each
    pair, ``s = +1`` if ``true_i > true_j`` else ``-1`` (ties count as -1, as in the authors'
    ``2 * sign(clamp(x, min=0)) - 1``), and the loss is
    ``mean(max(0, margin - s * (pred_i - pred_j)))``.

    Args:
        pred_loss: Predicted losses ``[B]`` or ``[B, 1]``.
        true_loss: True per-sample losses ``[B]`` or ``[B, 1]``; detached here, so the ranking
            loss never trains the model through its own target.
        margin: Required gap between the predictions of a correctly ordered pair.

    Returns:
        Scalar loss. For ``B < 2`` a zero that is still connected to ``pred_loss``'s graph,
        so ``backward()`` works.

    Raises:
        ValueError: On bad shapes or mismatched batch sizes.
    """
    pred = _as_vector(pred_loss, "pred_loss")
    true = _as_vector(true_loss, "true_loss").detach()
    if pred.shape != true.shape:
        raise ValueError(
            f"pred_loss and true_loss must have the same batch size, got {list(pred.shape)} and {list(true.shape)}"
        )
    half = pred.shape[0] // 2
    if half == 0:
        return pred.sum() * 0.0
    pred_diff = (pred - pred.flip(0))[:half]
    true_diff = (true - true.flip(0))[:half]
    sign = 2 * torch.sign(torch.clamp(true_diff, min=0)) - 1
    return torch.clamp(margin - sign * pred_diff, min=0).mean()


@dataclass(frozen=True)
class JointLoss:
    """The parts of the LL4AL objective for one batch.

    Attributes:
        total: ``ce + lam * ranking``, the scalar to backpropagate.
        ce: Mean cross-entropy of the target model.
        ranking: Loss prediction ranking loss.
        per_sample_ce: Cross-entropy per sample ``[B]`` (the LossNet's target).
    """

    total: Tensor
    ce: Tensor
    ranking: Tensor
    per_sample_ce: Tensor


def joint_loss(
    logits: Tensor,
    targets: Tensor,
    pred_loss: Tensor,
    lam: float = 1.0,
    margin: float = 1.0,
) -> JointLoss:
    """LL4AL objective: mean cross-entropy plus ``lam`` times the ranking loss (paper Eq. 3).

    Args:
        logits: Classifier outputs ``[B, num_classes]``.
        targets: Class indices ``[B]``.
        pred_loss: LossNet predictions ``[B]`` or ``[B, 1]``.
        lam: Weight of the ranking loss (lambda in the paper).
        margin: Ranking margin (xi in the paper).

    Returns:
        A :class:`JointLoss`.
    """
    per_sample_ce = F.cross_entropy(logits, targets, reduction="none")
    ce = per_sample_ce.mean()
    ranking = loss_prediction_ranking_loss(pred_loss, per_sample_ce, margin=margin)
    return JointLoss(total=ce + lam * ranking, ce=ce, ranking=ranking, per_sample_ce=per_sample_ce)
