"""An example of your own network for bcpkd: a factory called as small_cnn(num_classes=C, **arch_kwargs).

bcpkd finds the last nn.Linear (here `classifier`) and uses everything before it as the features; the
network takes normalised float images [B, 3, H, W] (bcpkd scales the uint8 store to [0, 1] and normalises
it first as `normalize` says: with the training data's channel statistics by default, ImageNet's, or none).
"""

from torch import nn


def small_cnn(num_classes: int, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks (the last two stride 2), global average pooling, a linear classifier."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))
