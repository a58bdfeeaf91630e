"""The proxy model of proxy mode: a small head on cached backbone features (Wen, Pizarro,
Williams, "Feature Alignment: Rethinking Efficient Active Learning via Proxy in the Context of
Pre-trained Models", arXiv 2403.01101).

A `ProxyHead` maps a feature vector [B, D] to logits [B, C]: a fixed standardisation (the
labeled features' mean and std, as buffers, so it is not scored), then `features` (identity for
a linear head, Linear+ReLU for an MLP), then `fc`. Its LossNet taps `features`: the head's
hidden features, or the cached features themselves for a linear head. The gradient-norm scorer
sees ordinary Linear layers, so proxy scores are exact per-sample gradient norms over the head's
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.lossnet import LossNet
from pipeline.models import FeatureTap

__all__ = ["PROXY_KINDS", "ProxyHead", "ProxySpec", "TAP_LAYER"]

PROXY_KINDS = ("linear", "mlp")
TAP_LAYER = "features"


class ProxyHead(nn.Module):
    """Linear or one-hidden-layer MLP classifier on [B, in_features] feature vectors.

    Args:
        in_features: D, the cached feature width.
        num_classes: C.
        hidden: MLP width, or None for a linear head.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        if in_features <= 0 or num_classes <= 0 or (hidden is not None and hidden <= 0):
            raise ValueError(
                f"in_features, num_classes and hidden must be positive, got {in_features}, {num_classes}, {hidden}"
            )
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.features = nn.Identity() if hidden is None else nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden or in_features, num_classes)
        self.expected_input = (in_features,)

    def standardize_with(self, features: Tensor) -> None:
        """Fix the input standardisation to these features' per-dimension mean and std."""
        self.shift.copy_(features.mean(dim=0))
        # Dead (always-zero) ReLU units have std 0: leave them unscaled instead of dividing by 0.
        std = features.std(dim=0) if len(features) > 1 else torch.ones_like(self.scale)
        self.scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"expected features [B, {self.shift.shape[0]}], got {list(x.shape)}")
        return self.fc(self.features((x - self.shift) * self.scale))

    def raw_linear(self) -> tuple[Tensor, Tensor]:
        """(weight [C, D], bias [C]) of a linear head with the standardisation folded in, i.e. the
        classifier on raw features: what linear probing hands to fine-tuning (LP-FT).

        Raises:
            ValueError: the head is an MLP.
        """
        if not isinstance(self.features, nn.Identity):
            raise ValueError("only a linear proxy head is a linear probe; train one with kind=linear")
        weight = self.fc.weight * self.scale
        bias = self.fc.bias - weight @ self.shift
        return weight.detach().clone(), bias.detach().clone()


@dataclass(frozen=True)
class ProxySpec:
    """What rebuilds a proxy: head kind and sizes, the LossNet width, and the feature store
    and backbone the head was trained on (a query checks the store it reads has that backbone)."""

    kind: Literal["linear", "mlp"]
    in_features: int
    num_classes: int
    hidden: int = 256
    lossnet_hidden: int = 128
    feature_store: str = ""
    backbone_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PROXY_KINDS:
            raise ValueError(f"proxy kind {self.kind!r} is unknown; choose one of {', '.join(PROXY_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "lossnet_hidden": self.lossnet_hidden,
            "feature_store": self.feature_store,
            "backbone_sha256": self.backbone_sha256,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProxySpec:
        return cls(
            values["kind"],
            int(values["in_features"]),
            int(values["num_classes"]),
            int(values.get("hidden", 256)),
            int(values.get("lossnet_hidden", 128)),
            str(values.get("feature_store", "")),
            str(values.get("backbone_sha256", "")),
        )

    def build(self) -> tuple[ProxyHead, LossNet, FeatureTap]:
        """Fresh (head, loss module, tap), the same triple a backbone checkpoint rebuilds."""
        head = ProxyHead(self.in_features, self.num_classes, self.hidden if self.kind == "mlp" else None)
        tap = FeatureTap(head, [TAP_LAYER])
        lossnet = LossNet.for_model(head, [TAP_LAYER], input_shape=(self.in_features,), hidden=self.lossnet_hidden)
        return head, lossnet, tap
