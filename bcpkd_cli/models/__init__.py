"""Architectures by name: a plain dict of constructors. Each model has `features` and `head`.

Every constructor takes `(input_shape, n_classes, hidden)`; image models read the channel count
from `input_shape` (C, H, W) and ignore `hidden`. Every model maps its input to pooled, flattened
features [B, F] with `features` and to logits [B, n_classes] with the final `head` Linear, and
`forward(x) == head(features(x))`, which is how last-layer Laplace finds the last layer.

Families: `resnet` (kuangliu/pytorch-cifar ResNet-18/34/50), `resnet_cifar` (RepDistiller
resnet20/56, resnet8x4/32x4), `wrn` (RepDistiller WRN-16/40-1/2), `vgg` (RepDistiller vgg8/13
with BN), `mobilenetv2` (RepDistiller `mobile_half`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bcpkd_cli.models import mobilenetv2, resnet, resnet_cifar, vgg, wrn


class MLP(nn.Module):
    """ReLU multilayer perceptron: features (all hidden layers) then a linear head."""

    def __init__(self, in_dim: int, n_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x.flatten(1)))


def _mlp(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    in_dim = 1
    for d in input_shape:
        in_dim *= d
    return MLP(in_dim, n_classes, tuple(hidden))


class ImageInput(nn.Module):
    """uint8 images [B, C, H, W] (or floats in [0, 1]) -> normalised floats, so models take the raw store."""

    MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 channel statistics, a fair default for natural images
    STD = (0.2470, 0.2435, 0.2616)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        mean = torch.tensor(self.MEAN[: x.shape[1]], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.STD[: x.shape[1]], device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # bf16 training: the channels_last layout of
            x = x.contiguous(memory_format=torch.channels_last)  # the weights (engine.prepare_for_device)
        return x


def _image(name: str, make: Callable[..., nn.Module]):
    """Adapt `make(n_classes, in_channels)` to the (input_shape, n_classes, hidden) signature."""

    def build(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...] = ()) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"{name} needs image inputs (C, H, W), got input_shape {tuple(input_shape)}")
        model = make(n_classes, in_channels=input_shape[0])
        model.features = nn.Sequential(ImageInput(), model.features)
        return model

    build.__name__ = build.__qualname__ = f"_{name}"
    return build


_IMAGE = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet20": resnet_cifar.resnet20,
    "resnet56": resnet_cifar.resnet56,
    "resnet8x4": resnet_cifar.resnet8x4,
    "resnet32x4": resnet_cifar.resnet32x4,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg13": vgg.vgg13,
    "mobilenetv2": mobilenetv2.mobile_half,
}

ARCHITECTURES = {"mlp": _mlp, **{name: _image(name, make) for name, make in _IMAGE.items()}}


def feature_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What `model.features` takes: MLP.forward flattens its inputs first; image models take them as they are."""
    return inputs.flatten(1) if isinstance(model, MLP) else inputs


HEAD_NAME = "head"  # the name of every model's last linear layer (last-layer Laplace)


def model_spec(arch: str, input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...],
               dropout: float = 0.0) -> dict:
    """The plain-value description of an architecture that checkpoints store."""
    return {"arch": arch, "input_shape": list(input_shape), "n_classes": n_classes, "hidden": list(hidden),
            "dropout": dropout}


def add_dropout(model: nn.Module, rate: float) -> None:
    """Dropout after every hidden ReLU of an MLP; on the pooled features (before the head) of an image model."""
    if isinstance(model, MLP):
        layers: list[nn.Module] = []
        for layer in model.features:
            layers += [layer, nn.Dropout(rate)] if isinstance(layer, nn.ReLU) else [layer]
        model.features = nn.Sequential(*layers)
    else:
        model.features = nn.Sequential(model.features, nn.Dropout(rate))


def build_model(spec: dict, state_dict: dict | None = None) -> nn.Module:
    """Build from a model_spec, optionally loading weights."""
    model = ARCHITECTURES[spec["arch"]](tuple(spec["input_shape"]), spec["n_classes"], tuple(spec["hidden"]))
    if spec.get("dropout", 0.0) > 0.0:
        add_dropout(model, spec["dropout"])
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits [N, C] of an eval-mode model, computed in chunks."""
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
