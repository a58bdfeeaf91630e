"""CIFAR-style ResNet-18 for 32x32 inputs (He et al., 2016, Sec. 4.2 variant used by LL4AL).

Differs from the ImageNet ResNet-18 only in the stem: a 3x3 stride-1 convolution and no
max-pool, so a 32x32 image keeps 32x32 resolution in ``layer1``. The residual blocks are
torchvision's ``BasicBlock`` so module names (``conv1``, ``bn1``, ``downsample``...) match
the torchvision backbones and code written against one works on the other.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pipeline.models.registry import register_model

__all__ = ["CifarResNet18", "cifar_resnet18"]


class CifarResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem: BasicBlocks [2, 2, 2, 2], widths 64/128/256/512.

    Feature maps for a 32x32 input: ``layer1`` [B, 64, 32, 32], ``layer2`` [B, 128, 16, 16],
    ``layer3`` [B, 256, 8, 8], ``layer4`` [B, 512, 4, 4].

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
    """

    tap_layers: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self._inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, blocks=2, stride=1)
        self.layer2 = self._make_layer(128, blocks=2, stride=2)
        self.layer3 = self._make_layer(256, blocks=2, stride=2)
        self.layer4 = self._make_layer(512, blocks=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # Imported on first build: importing torchvision imports torch._dynamo (about 2 CPU-s),
        # which every process importing the model registry would pay for, this model or not.
        from torchvision.models.resnet import BasicBlock

        downsample = None
        if stride != 1 or self._inplanes != planes:
            # Projection shortcut when the block changes resolution or width.
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # Same scheme as torchvision's ResNet so both families start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, C, H, W] to logits [B, num_classes]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar_resnet18", input_shape=(3, 32, 32))
def cifar_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """Build a :class:`CifarResNet18` (the LL4AL CIFAR-10 backbone)."""
    return CifarResNet18(num_classes=num_classes, in_channels=in_channels)
