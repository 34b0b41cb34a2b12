"""The shape every bcpkd model has: pooled features, then one linear head (last-layer Laplace uses it)."""

from __future__ import annotations

import math

import torch
from torch import nn


class FeaturesHead(nn.Module):
    """forward(x) = head(features(x)); subclasses set `features` ([B, ...] -> [B, F]) and `head`."""

    features: nn.Module
    head: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def reference_init(model: nn.Module) -> None:
    """RepDistiller's initialisation: He-normal convolutions, unit BatchNorm, N(0, 0.01) linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()
