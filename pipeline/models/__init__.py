"""Backbones by name (timm-style registry), feature taps, and input checks.

Importing this package registers every built-in model: ``cifar_resnet18``, ``small_cnn``,
``resnet18``, ``resnet50``, ``vit_tiny``.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.models import cifar_resnet, small_cnn, torchvision_resnet, vit  # noqa: F401  (registers)
from pipeline.models.feature_tap import FeatureTap, default_tap_layers, feature_shapes
from pipeline.models.registry import (
    ModelFactory,
    available_models,
    create_model,
    input_spec,
    register_model,
)
from pipeline.models.weights import load_weights

__all__ = [
    "FeatureTap",
    "ModelFactory",
    "available_models",
    "create_model",
    "default_tap_layers",
    "feature_shapes",
    "input_spec",
    "load_weights",
    "register_model",
    "validate_input",
]


def validate_input(x: Tensor, in_channels: int) -> None:
    """Check that ``x`` is an image batch ``[B, in_channels, H, W]`` before it reaches a model.

    Convolution errors deep inside a backbone do not say which input was wrong; this does.

    Args:
        x: The candidate input batch.
        in_channels: Channels the model was built with.

    Raises:
        TypeError: If ``x`` is not a Tensor.
        ValueError: If ``x`` is not 4-D or has the wrong channel count.
    """
    want = f"[B, {in_channels}, H, W]"
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor of shape {want}, got {type(x).__name__}")
    got = list(x.shape)
    if x.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"expected inputs of shape {want}, got {got}: inputs must be 4-D{hint}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected inputs of shape {want}, got {got}: the model takes {in_channels} input channels")
