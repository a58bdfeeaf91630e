"""torchvision's ImageNet ResNet-18/50, randomly initialised, with any number of input channels.

The modules are torchvision's own (including their in-place ReLUs), so behaviour and
module names match upstream exactly; only the stem convolution is swapped when
``in_channels != 3``. torchvision is imported on first build: importing it imports
torch._dynamo (about 2 CPU-s), which every process importing the model registry (each Ray
worker of a job) would otherwise pay for, these models or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from pipeline.models.registry import register_model

if TYPE_CHECKING:
    from torchvision.models import ResNet

__all__ = ["resnet18", "resnet50"]


def _build(builder: Callable[..., ResNet], num_classes: int, in_channels: int) -> ResNet:
    # weights=None: never download; pretrained weights come in through create_model(weights=path).
    model = builder(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=False,
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18", input_shape=(3, 224, 224))
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """Build torchvision's ResNet-18 (BasicBlocks, ``layer4`` width 512)."""
    from torchvision.models import resnet18 as tv_resnet18

    return _build(tv_resnet18, num_classes, in_channels)


@register_model("resnet50", input_shape=(3, 224, 224))
def resnet50(num_classes: int, in_channels: int) -> nn.Module:
    """Build torchvision's ResNet-50 (Bottlenecks, ``layer4`` width 2048)."""
    from torchvision.models import resnet50 as tv_resnet50

    return _build(tv_resnet50, num_classes, in_channels)
