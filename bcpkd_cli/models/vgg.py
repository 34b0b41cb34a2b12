"""VGG with BatchNorm for CIFAR, as in CRD / RepDistiller (models/vgg.py, `vgg8_bn`, `vgg13_bn`).

Five conv blocks; the hidden FC layers are removed, so the classifier is one Linear(512, C).
Each block ends with a BN (its trailing ReLU is applied outside, as in the reference).
Max-pool after blocks 0-2; after block 3 only for 64x64 inputs; global average pool at the end.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli.models.base import FeaturesHead, reference_init

CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    """(conv3x3-BN-ReLU) per width, with the last ReLU dropped."""
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGGFeatures(nn.Module):
    """Images [B, C, H, W] -> [B, 512]."""

    def __init__(self, cfg: list[list[int]], in_channels: int = 3):
        super().__init__()
        widths = [in_channels] + [c[-1] for c in cfg]
        self.blocks = nn.ModuleList(_block(cfg[i], widths[i]) for i in range(5))
        self.pool = nn.MaxPool2d(2, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        for i, block in enumerate(self.blocks):
            x = F.relu(block(x))  # block i at 32x32 input: 32, 16, 8, 4, 4
            if i < 3 or (i == 3 and h == 64):
                x = self.pool(x)
        return self.gap(x).flatten(1)  # [B, 512]


class VGG(FeaturesHead):
    """`features`: VGGFeatures; `head`: Linear(512, n_classes)."""

    def __init__(self, cfg: list[list[int]], n_classes: int, in_channels: int = 3):
        super().__init__()
        self.features = VGGFeatures(cfg, in_channels)
        self.head = nn.Linear(512, n_classes)
        reference_init(self)


def vgg8(n_classes: int, in_channels: int = 3) -> VGG:
    return VGG(CFG["vgg8"], n_classes, in_channels)


def vgg13(n_classes: int, in_channels: int = 3) -> VGG:
    return VGG(CFG["vgg13"], n_classes, in_channels)
