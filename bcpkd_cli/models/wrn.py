"""Wide ResNets of CRD / RepDistiller (HobbitLong/RepDistiller, models/wrn.py).

WRN-d-k: depth d = 6n+4, stage widths 16, 16k, 32k, 64k; pre-activation (BN-ReLU-conv)
blocks, dropout 0. A final BN-ReLU precedes global average pooling.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from bcpkd_cli.models.base import FeaturesHead


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3. When widths differ, the shortcut is a 1x1 conv
    applied to the pre-activated input; otherwise it is the identity on the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.equal_in_out else self.conv_shortcut(act))


def _stage(n: int, in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """n blocks; only the first changes width and carries the stride."""
    blocks = [BasicBlock(in_planes, out_planes, stride)]
    blocks += [BasicBlock(out_planes, out_planes, 1) for _ in range(1, n)]
    return nn.Sequential(*blocks)


class WideResNet(FeaturesHead):
    """`features`: images [B, C, 32, 32] -> [B, 64k]; `head`: Linear to n_classes."""

    def __init__(self, depth: int, widen_factor: int, n_classes: int, in_channels: int = 3):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth should be 6n+4"
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers = [
            ("conv1", nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)),  # [B, 16, 32, 32]
            ("block1", _stage(n, ch[0], ch[1], 1)),  # [B, 16k, 32, 32]
            ("block2", _stage(n, ch[1], ch[2], 2)),  # [B, 32k, 16, 16]
            ("block3", _stage(n, ch[2], ch[3], 2)),  # [B, 64k, 8, 8]
            ("bn1", nn.BatchNorm2d(ch[3])),
            ("relu", nn.ReLU()),
            ("pool", nn.AdaptiveAvgPool2d(1)),  # [B, 64k, 1, 1] (= avg_pool2d(8) at 32x32)
            ("flatten", nn.Flatten()),  # [B, 64k]
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.head = nn.Linear(ch[3], n_classes)
        for m in self.modules():  # reference init
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()


def wrn_16_1(n_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, n_classes, in_channels)


def wrn_16_2(n_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, n_classes, in_channels)


def wrn_40_1(n_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, n_classes, in_channels)


def wrn_40_2(n_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, n_classes, in_channels)
