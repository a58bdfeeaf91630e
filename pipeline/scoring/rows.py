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

    def __init__(
        self,
        build: Callable[[], tuple[nn.Module, nn.Module | None, Any]],
        device: str = "auto",
        norm: Norm = "per_tensor_sum",
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model, loss_module, tap = build()
        self.model = model.to(self.device)
        if loss_module is not None:
            loss_module = loss_module.to(self.device)
        self.scorer = GradNormScorer(self.model, norm=norm, loss_module=loss_module, tap=tap)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score the rows that decoded; rows that arrive with an error pass through unscored.

        Args:
            batch: "image" [B, C, H, W] plus pass-through columns; an optional "error" column
                (None or reason) marks rows that failed upstream (decode, read).

        Returns:
            The pass-through columns (without "image") plus SCORE_COLUMNS.
        """
        size = len(batch["image"])
        upstream = batch.get("error")
        errors: list[str | None] = list(upstream) if upstream is not None else [None] * size
        ok = np.array([e is None for e in errors], dtype=bool)
        out = {
            "score": np.full(size, np.nan, np.float32),
            "entropy": np.full(size, np.nan, np.float32),
            "margin": np.full(size, np.nan, np.float32),
            "least_confidence": np.full(size, np.nan, np.float32),
            "pred_class": np.full(size, -1, np.int64),
            "pred_prob": np.full(size, np.nan, np.float32),
            "predicted_loss": np.full(size, np.nan, np.float32),
        }
        if ok.any():
            array = np.ascontiguousarray(np.asarray(batch["image"])[ok] if not ok.all() else batch["image"])
            # Ray hands out read-only views of its object store; torch needs a writable buffer.
            array = array if array.flags.writeable else array.copy()
            result = self.scorer(torch.from_numpy(array).to(self.device, torch.float32))
            fields = {
                "score": result.gradnorm,
                "entropy": result.entropy,
                "margin": result.margin,
                "least_confidence": result.least_confidence,
                "pred_class": result.pred_class,
                "pred_prob": result.pred_prob,
                "predicted_loss": result.predicted_loss,
            }
            for name, values in fields.items():
                if values is not None:
                    out[name][ok] = values.numpy()
            for index, error in zip(np.flatnonzero(ok), result.errors):
                errors[index] = error
        rows = {name: values for name, values in batch.items() if name not in ("image", "error")}
        rows.update(out)
        rows["error"] = np.array(errors, dtype=object)
        return rows
