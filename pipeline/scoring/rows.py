"""Batch-in, rows-out scoring: the callable class a Ray Data actor pool runs.

It is a plain class (no Ray import): the model is built once in `__init__`, then every call
maps a batch {"key": [B], "image": [B, C, H, W]} to per-sample rows that carry the keys through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.scoring.gradnorm import GradNormScorer, Norm

__all__ = ["RowScorer", "SCORE_COLUMNS"]

# Per-sample output columns besides the pass-through ones (key, shard, ...).
SCORE_COLUMNS = ("score", "entropy", "margin", "least_confidence", "pred_class", "pred_prob", "predicted_loss", "error")


class RowScorer:
    """Scores numpy batches with LPLgrad and every uncertainty statistic in one pass.

    Args:
        build: returns (model, loss_module or None, tap or None); called once, in the actor.
        device: "cpu", "cuda" or "auto" (CUDA when visible to this process).
        norm: gradient-norm reduction, as in `gradnorm_scores`.
    """

    def __init__(self, build: Callable[[], tuple[nn.Module, nn.Module | None, Any]], device: str = "auto", norm: Norm = "per_tensor_sum") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model, loss_module, tap = build()
        self.model = model.to(self.device)
        if loss_module is not None:
            loss_module = loss_module.to(self.device)
        self.scorer = GradNormScorer(self.model, norm=norm, loss_module=loss_module, tap=tap)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(batch["image"])
        # Ray hands out read-only views of its object store; torch needs a writable buffer.
        array = array if array.flags.writeable else array.copy()
        images = torch.from_numpy(array).to(self.device, torch.float32)
        result = self.scorer(images)
        rows = {name: values for name, values in batch.items() if name != "image"}
        predicted = result.predicted_loss
        rows.update(
            score=result.gradnorm.numpy(),
            entropy=result.entropy.numpy(),
            margin=result.margin.numpy(),
            least_confidence=result.least_confidence.numpy(),
            pred_class=result.pred_class.numpy(),
            pred_prob=result.pred_prob.numpy(),
            predicted_loss=predicted.numpy() if predicted is not None else np.full(len(images), np.nan, np.float32),
            error=np.array(result.errors, dtype=object),
        )
        return rows
