"""Uncertainty statistics of a batch of logits: the quantities every acquisition strategy reads.

All functions take logits of shape [B, C] and return per-sample tensors of shape [B]. They are
raw statistics, not "higher is better" acquisition scores: turning them into scores is the
strategy's job (for example a small margin means an uncertain sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy", "top2", "margin", "least_confidence"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits).

    Args:
        logits: [B, C] unnormalised class scores.

    Returns:
        [B] entropy of each row. Computed from log_softmax so that confident rows do not produce
        0 * log(0) = NaN.
    """
    # Half-precision logits (autocast) are promoted: entropy gradients of confident samples are
    # tiny differences that bf16 cannot resolve.
    logits = logits.float() if logits.dtype in _LOW_PRECISION else logits
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def top2(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Largest two softmax probabilities and the argmax class.

    Args:
        logits: [B, C] with C >= 1.

    Returns:
        (p1 [B], p2 [B], predicted class [B] int64). For a single-class model p2 is zero.
    """
    probs = torch.softmax(logits.float() if logits.dtype in _LOW_PRECISION else logits, dim=-1)
    if probs.shape[-1] == 1:
        return probs[:, 0], torch.zeros_like(probs[:, 0]), torch.zeros(probs.shape[0], dtype=torch.long)
    values, indices = probs.topk(2, dim=-1)
    return values[:, 0], values[:, 1], indices[:, 0]


def margin(logits: Tensor) -> Tensor:
    """Difference between the two largest class probabilities, [B]; small means uncertain."""
    p1, p2, _ = top2(logits)
    return p1 - p2


def least_confidence(logits: Tensor) -> Tensor:
    """One minus the largest class probability, [B]; large means uncertain."""
    p1, _, _ = top2(logits)
    return 1.0 - p1
