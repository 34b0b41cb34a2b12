"""MobileNetV2 for CIFAR as in CRD / RepDistiller (models/mobilenetv2.py, `mobile_half`).

Expansion T=6, width multiplier 0.5 on all widths except the last 1x1 conv (1280 channels).
The stem conv has stride 2, so a 32x32 image ends at 2x2 before global average pooling.
Unlike torchvision, the t=1 block keeps its (1x expansion) pointwise conv.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bcpkd_cli.models.base import FeaturesHead, reference_init


def _setting(T: int) -> list[list[int]]:
    """Rows t (expansion), c (width before the multiplier), n (blocks), s (first stride)."""
    return [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2], [T, 320, 1, 1]]


def _conv_bn_relu(inp: int, oup: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, k, stride, k // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise (stride) - 1x1 linear project; identity skip when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hid = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(FeaturesHead):
    """`features`: images [B, C, 32, 32] -> [B, 1280]; `head`: Linear(1280, n_classes)."""

    def __init__(self, n_classes: int, T: int = 6, width_mult: float = 0.5, in_channels: int = 3):
        super().__init__()
        inp = int(32 * width_mult)
        layers: list[tuple[str, nn.Module]] = [("conv1", _conv_bn_relu(in_channels, inp, 3, 2))]  # [B, 16, 16, 16]
        for i, (t, c, n, s) in enumerate(_setting(T)):
            oup, blocks = int(c * width_mult), []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(inp, oup, stride, t))
                inp = oup
            layers.append((f"block{i}", nn.Sequential(*blocks)))  # ends [B, 160, 2, 2] at 32x32
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        layers += [
            ("conv2", _conv_bn_relu(inp, last, 1, 1)),  # [B, 1280, 2, 2]
            ("pool", nn.AdaptiveAvgPool2d(1)),  # [B, 1280, 1, 1]
            ("flatten", nn.Flatten()),  # [B, 1280]
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.head = nn.Linear(last, n_classes)
        reference_init(self)


def mobile_half(n_classes: int, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's `mobile_half`: T=6, width 0.5."""
    return MobileNetV2(n_classes, T=6, width_mult=0.5, in_channels=in_channels)
