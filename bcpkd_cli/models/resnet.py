"""ResNet-18/34/50 for 32x32 inputs, as in kuangliu/pytorch-cifar (models/resnet.py).

torchvision-style BasicBlock/Bottleneck, but the stem is a single 3x3 stride-1 conv with no
max-pool, so a 32x32 image reaches layer4 at 4x4. Parameter counts match the reference
(ResNet-18, 10 classes: 11,173,962).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli.models.base import FeaturesHead


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 strided projection with BatchNorm when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs; 1x1 conv + BN projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4; projection shortcut as above."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FeaturesHead):
    """`features`: images [B, C, H, W] -> [B, 512 * expansion]; `head`: Linear to n_classes."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], n_classes: int, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        layers = [
            ("conv1", nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)),  # [B, 64, 32, 32]
            ("bn1", nn.BatchNorm2d(64)),
            ("relu", nn.ReLU()),
            ("layer1", self._make_layer(block, 64, num_blocks[0], 1)),  # [B, 64e, 32, 32]
            ("layer2", self._make_layer(block, 128, num_blocks[1], 2)),  # [B, 128e, 16, 16]
            ("layer3", self._make_layer(block, 256, num_blocks[2], 2)),  # [B, 256e, 8, 8]
            ("layer4", self._make_layer(block, 512, num_blocks[3], 2)),  # [B, 512e, 4, 4]
            ("pool", nn.AdaptiveAvgPool2d(1)),  # [B, 512e, 1, 1] (= avg_pool2d(4) at 32x32)
            ("flatten", nn.Flatten()),  # [B, 512e]
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.head = nn.Linear(512 * block.expansion, n_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)


def resnet18(n_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], n_classes, in_channels)


def resnet34(n_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], n_classes, in_channels)


def resnet50(n_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], n_classes, in_channels)
