"""CIFAR ResNets of CRD / RepDistiller (HobbitLong/RepDistiller, models/resnet.py).

Depth 6n+2 with BasicBlocks in three stages at 32x32, 16x16 and 8x8. `num_filters` gives the
stem width then the three stage widths: [16, 16, 32, 64] for resnet20/56, and
[32, 64, 128, 256] (4x) for resnet8x4/32x4.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli.models.base import FeaturesHead


class BasicBlock(nn.Module):
    """Two 3x3 convs; optional downsample (1x1 conv + BN) on the residual."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class CifarResNet(FeaturesHead):
    """`features`: images [B, C, 32, 32] -> [B, num_filters[3]]; `head`: Linear to n_classes."""

    def __init__(self, depth: int, num_filters: list[int], n_classes: int, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth should be 6n+2, e.g. 8, 20, 32, 56"
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        layers = [
            ("conv1", nn.Conv2d(in_channels, num_filters[0], 3, 1, 1, bias=False)),  # [B, f0, 32, 32]
            ("bn1", nn.BatchNorm2d(num_filters[0])),
            ("relu", nn.ReLU()),
            ("layer1", self._make_layer(num_filters[1], n, 1)),  # [B, f1, 32, 32]
            ("layer2", self._make_layer(num_filters[2], n, 2)),  # [B, f2, 16, 16]
            ("layer3", self._make_layer(num_filters[3], n, 2)),  # [B, f3, 8, 8]
            ("pool", nn.AdaptiveAvgPool2d(1)),  # [B, f3, 1, 1] (= AvgPool2d(8) at 32x32)
            ("flatten", nn.Flatten()),  # [B, f3]
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.head = nn.Linear(num_filters[3], n_classes)
        for m in self.modules():  # reference init; Linear keeps PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        blocks += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)


def resnet20(n_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, [16, 16, 32, 64], n_classes, in_channels)


def resnet56(n_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, [16, 16, 32, 64], n_classes, in_channels)


def resnet8x4(n_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, [32, 64, 128, 256], n_classes, in_channels)


def resnet32x4(n_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, [32, 64, 128, 256], n_classes, in_channels)
