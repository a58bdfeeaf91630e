"""Batch-in, rows-out scoring: the callable class a Ray Data actor pool runs.

It is a plain class (no Ray import): the model is built once in `__init__`, then every call
maps a batch {"key": [B], "image": [B, C, H, W]} to per-sample rows that carry the keys through.

What a row holds follows what the selection reads:

- ``gradnorm=True`` (strategies that read the gradient norm: ``lplgrad``): one forward and one
  backward (`GradNormScorer`), every column filled.
- ``gradnorm=False`` (``margin``, ``entropy``, ``lpl``, ``random``, ``badge``, ``cluster-margin``...):
  the forward pass alone, in eval mode without autograd; the same statistics, ``score`` left NaN.
  The backward pass is most of a scoring pass's cost, and nobody reads its result.
- ``embeddings=True`` (the diverse strategies): two more columns, ``residual`` = ``p - onehot(argmax p)``
  [B, C] and ``penultimate`` = the classifier's inputs [B, D], taken by hooks on the model's last
  ``nn.Linear`` in the same pass (`pipeline.acquisition.candidates`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.acquisition.candidates import classifier_head, prediction_residuals
from pipeline.scoring.gradnorm import BatchScores, GradNormScorer, Norm, _check_norm
from pipeline.scoring.uncertainty import entropy, top2

__all__ = ["EMBEDDING_COLUMNS", "RowScorer", "SCORE_COLUMNS"]

# Per-sample output columns besides the pass-through ones (key, shard, ...).
SCORE_COLUMNS = ("score", "entropy", "margin", "least_confidence", "pred_class", "pred_prob", "predicted_loss", "error")
# With embeddings=True: [B, C] and [B, D] float32 (NaN on rows that did not score).
EMBEDDING_COLUMNS = ("residual", "penultimate")


class RowScorer:
    """Scores numpy batches with LPLgrad and every uncertainty statistic in one pass.

    Args:
        build: returns (model, loss_module or None, tap or None); called once, in the actor.
        device: "cpu", "cuda" or "auto" (CUDA when visible to this process).
        norm: gradient-norm reduction, as in `gradnorm_scores`.
        gradnorm: run the backward pass for the LPLgrad ``score``; False leaves it NaN (forward only).
        embeddings: add the ``residual`` and ``penultimate`` columns (see the module doc).

    Raises:
        ValueError: On an unknown norm, or ``embeddings`` for a model without an ``nn.Linear`` head.
    """

    def __init__(
        self,
        build: Callable[[], tuple[nn.Module, nn.Module | None, Any]],
        device: str = "auto",
        norm: Norm = "per_tensor_sum",
        gradnorm: bool = True,
        embeddings: bool = False,
    ) -> None:
        _check_norm(norm)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model, loss_module, tap = build()
        self.model = model.to(self.device)
        self.loss_module = loss_module.to(self.device) if loss_module is not None else None
        self.tap = tap
        self.scorer = GradNormScorer(self.model, norm=norm, loss_module=self.loss_module, tap=tap) if gradnorm else None
        self._head_calls: list[tuple[Tensor, Tensor]] = []
        self._head_hook = None
        self._widths = (0, 0)
        if embeddings:
            head = classifier_head(self.model)
            self._widths = (head.out_features, head.in_features)  # (C, D), also for batches without a scored row
            self._head_hook = head.register_forward_hook(self._record_head)

    def close(self) -> None:
        """Detach every hook from the model (for a model that lives on after scoring); the scorer
        cannot be used afterwards."""
        if self.scorer is not None:
            self.scorer.remove()
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def _record_head(self, _module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self._head_calls.append((args[0].detach().flatten(1), output.detach()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score the rows that decoded; rows that arrive with an error pass through unscored.

        Args:
            batch: "image" [B, C, H, W] plus pass-through columns; an optional "error" column
                (None or reason) marks rows that failed upstream (decode, read).

        Returns:
            The pass-through columns (without "image") plus SCORE_COLUMNS, and EMBEDDING_COLUMNS
            with ``embeddings=True``.
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
        embedded: tuple[Tensor, Tensor] | None = None
        if ok.any():
            array = np.ascontiguousarray(np.asarray(batch["image"])[ok] if not ok.all() else batch["image"])
            # Ray hands out read-only views of its object store; torch needs a writable buffer.
            array = array if array.flags.writeable else array.copy()
            inputs = torch.from_numpy(array).to(self.device, torch.float32)
            self._head_calls.clear()
            try:
                result = self.scorer(inputs) if self.scorer is not None else self._forward_only(inputs)
                if self._head_hook is not None:
                    embedded = self._embeddings(len(array))
            finally:
                self._head_calls.clear()
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
        if self._head_hook is not None:
            rows.update(self._embedding_columns(size, ok, errors, embedded, self._widths))
        rows["error"] = np.array(errors, dtype=object)
        return rows

    @torch.no_grad()
    def _forward_only(self, inputs: Tensor) -> BatchScores:
        """The scorer's statistics from one forward pass in eval mode; ``gradnorm`` NaN."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        if self.loss_module is not None:
            self.loss_module.eval()
        try:
            if self.tap is not None:
                with self.tap.capture() as features:
                    logits = self.model(inputs)
            else:
                logits = self.model(inputs)
            predicted = None
            if self.loss_module is not None:
                predicted = self.loss_module(list(features)).float().reshape(-1).cpu()
        finally:
            for module, mode in modes.items():
                module.training = mode
        logits = logits.float()
        if logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            raise ValueError(f"the model must return logits [B, C]; got {tuple(logits.shape)} for B={inputs.shape[0]}")
        valid = torch.isfinite(logits).all(dim=1)
        safe = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        p1, p2, cls = top2(safe)
        nan = torch.full_like(p1, float("nan"))
        return BatchScores(
            gradnorm=nan.cpu(),
            entropy=torch.where(valid, entropy(safe), nan).cpu(),
            margin=torch.where(valid, p1 - p2, nan).cpu(),
            least_confidence=torch.where(valid, 1.0 - p1, nan).cpu(),
            pred_class=torch.where(valid, cls, torch.full_like(cls, -1)).cpu(),
            pred_prob=torch.where(valid, p1, nan).cpu(),
            predicted_loss=predicted,
            errors=[None if v else "non-finite logits" for v in valid.tolist()],
        )

    def _embeddings(self, rows: int) -> tuple[Tensor, Tensor]:
        """(residual [B, C], penultimate [B, D]) from the head's single call in this batch's forward."""
        calls = [(h, o) for h, o in self._head_calls if h.shape[0] == rows]
        if len(calls) != 1:
            raise ValueError(
                f"the classifier head ran {len(self._head_calls)} times in one forward; embeddings need it "
                "once per batch (a model whose last nn.Linear is its classifier)"
            )
        features, logits = calls[0]
        return prediction_residuals(logits).cpu(), features.float().cpu()

    @staticmethod
    def _embedding_columns(
        size: int,
        ok: np.ndarray,
        errors: list[str | None],
        embedded: tuple[Tensor, Tensor] | None,
        widths: tuple[int, int],
    ) -> dict[str, np.ndarray]:
        columns = {
            "residual": np.full((size, widths[0]), np.nan, np.float32),
            "penultimate": np.full((size, widths[1]), np.nan, np.float32),
        }
        if embedded is None:
            return columns
        columns["residual"][ok] = embedded[0].numpy()
        columns["penultimate"][ok] = embedded[1].numpy()
        failed = np.array([e is not None for e in errors], dtype=bool)
        columns["residual"][failed] = np.nan
        columns["penultimate"][failed] = np.nan
        return columns
