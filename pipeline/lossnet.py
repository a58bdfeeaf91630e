"""Loss prediction module of "Learning Loss for Active Learning" (Yoo & Kweon, CVPR 2019).

Each tapped feature map goes through global average pooling, a fully connected layer and a
ReLU; the per-feature vectors are concatenated and a last fully connected layer predicts one
scalar loss per sample (paper Fig. 2b: GAP -> FC(128) -> ReLU per stage, concat, FC(1)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.feature_tap import feature_shapes

__all__ = ["LossNet"]


class LossNet(nn.Module):
    """Predict each sample's loss from intermediate backbone features.

    Args:
        feature_channels: Channel count of each tapped feature, in tap order.
        hidden: Width of each per-feature fully connected layer (128 in the paper).

    Raises:
        ValueError: If ``feature_channels`` is empty or holds a non-positive value, or
            ``hidden`` is not positive.
    """

    def __init__(self, feature_channels: Sequence[int], hidden: int = 128) -> None:
        super().__init__()
        channels = [int(c) for c in feature_channels]
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"feature_channels must be positive ints, got {list(feature_channels)}")
        if hidden <= 0:
            raise ValueError(f"hidden must be positive, got {hidden}")
        self.feature_channels = tuple(channels)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(c, hidden), nn.ReLU()) for c in channels)
        self.out = nn.Linear(len(channels) * hidden, 1)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        hidden: int = 128,
    ) -> LossNet:
        """Size a LossNet for ``model`` by a dry run, so channel counts are never hard-coded.

        Args:
            model: The backbone.
            layers: Tapped module names; ``None`` means the model's default tap layers.
            input_shape: Per-sample input ``(C, H, W)``; ``None`` means
                ``model.expected_input`` (set by ``create_model``).
            hidden: Width of each per-feature layer.

        Returns:
            A LossNet on CPU whose heads match the tapped features' channels.

        Raises:
            ValueError: If ``input_shape`` is missing and the model has no ``expected_input``,
                or a layer name is unknown.
        """
        if input_shape is None:
            input_shape = getattr(model, "expected_input", None)
            if input_shape is None:
                raise ValueError(f"{type(model).__name__} has no expected_input; pass input_shape=(C, H, W)")
        shapes = feature_shapes(model, layers, input_shape)
        if any(len(s) == 0 for s in shapes):
            raise ValueError(f"tapped features must have a channel dimension, got shapes {shapes}")
        return cls([s[0] for s in shapes], hidden=hidden)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Predict per-sample losses.

        Args:
            features: One tensor per head, each ``[B, C_i, *spatial]`` or ``[B, C_i]``.

        Returns:
            Predicted losses ``[B]``.

        Raises:
            ValueError: If the number of features or a channel count does not match.
        """
        if len(features) != len(self.heads):
            raise ValueError(
                f"LossNet expects {len(self.heads)} features "
                f"(channels {list(self.feature_channels)}), got {len(features)}"
            )
        pooled = []
        for i, (f, head) in enumerate(zip(features, self.heads)):
            if f.dim() < 2 or f.shape[1] != self.feature_channels[i]:
                raise ValueError(f"feature {i} must be [B, {self.feature_channels[i]}, ...], got {list(f.shape)}")
            # Global average pool over all spatial dims: [B, C, *S] -> [B, C]; any S works.
            v = f.flatten(2).mean(dim=2) if f.dim() > 2 else f
            pooled.append(head(v))
        # Concatenate heads: n x [B, hidden] -> [B, n * hidden] -> [B, 1] -> [B].
        return self.out(torch.cat(pooled, dim=1)).squeeze(1)
