"""Batch-in, rows-out feature extraction: the callable a Ray Data actor pool runs to fill a
feature store (`pipeline.proxy.store`), and the reverse step that turns stored rows back into
a numpy batch for a proxy scorer.

Plain classes and functions, no Ray: the backbone is built once in `__init__`; every call maps a
decoded batch {"key", "shard", "image" [B, C, H, W], "error"} to rows in the store's schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.acquisition.coreset import penultimate_features
from pipeline.proxy.store import features_matrix, features_table

__all__ = ["FeatureExtractor", "feature_batch", "feature_dim"]


def feature_dim(model: nn.Module) -> int:
    """Width of the penultimate features, from a dry run on the model's expected input."""
    expected = getattr(model, "expected_input", None)
    if expected is None:
        raise ValueError(f"{type(model).__name__} has no expected_input; build it with pipeline.models.create_model")
    return int(penultimate_features(model, torch.zeros(2, *expected)).shape[1])


class FeatureExtractor:
    """Penultimate features (the classifier's input) of every decoded sample, in eval mode.

    Args:
        build: returns (model, ...) as `build_from_checkpoint` does; called once, in the actor.
        generation: the store generation these rows belong to.
        device: "cpu", "cuda" or "auto" (CUDA when visible to this process).
    """

    def __init__(self, build: Callable[[], tuple[Any, ...]], generation: str, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = build()[0].to(self.device).eval()
        self.generation = generation
        self.dim = feature_dim(self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        features = np.zeros((len(errors), self.dim), np.float32)
        if ok.any():
            images = np.ascontiguousarray(np.asarray(batch["image"])[ok])
            # Ray hands out read-only views of its object store; torch needs a writable buffer.
            images = images if images.flags.writeable else images.copy()
            values = (
                penultimate_features(self.model, torch.from_numpy(images).to(self.device, torch.float32))
                .float()
                .cpu()
                .numpy()
            )
            finite = np.isfinite(values).all(axis=1)
            for index in np.flatnonzero(ok)[~finite]:
                errors[index] = "non-finite features (check the input and the backbone weights)"
            features[ok] = np.where(finite[:, None], values, 0.0)
        return features_table(
            [k if isinstance(k, str) else None for k in batch["key"]],
            list(batch["shard"]),
            self.generation,
            features,
            errors,
        )


def feature_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """Store rows -> {"key", "shard", "image": [B, D] float32, "error"}, the batch a
    `RowScorer` takes (error rows get zero features; they are not scored)."""
    images = features_matrix(table)
    return {
        "key": np.array(table.column("key").to_pylist(), dtype=object),
        "shard": np.array(table.column("shard").to_pylist(), dtype=object),
        "image": images,
        "error": np.array(table.column("error").to_pylist(), dtype=object),
    }
