"""Architectures by name: a plain dict of constructors. Each model has `features` and `head`."""

from __future__ import annotations

from torch import nn


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


ARCHITECTURES = {"mlp": _mlp}

HEAD_NAME = "head"  # the name of every model's last linear layer (last-layer Laplace)


def model_spec(arch: str, input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...]) -> dict:
    """The plain-value description of an architecture that checkpoints store."""
    return {"arch": arch, "input_shape": list(input_shape), "n_classes": n_classes, "hidden": list(hidden)}


def build_model(spec: dict, state_dict: dict | None = None) -> nn.Module:
    """Build from a model_spec, optionally loading weights."""
    model = ARCHITECTURES[spec["arch"]](tuple(spec["input_shape"]), spec["n_classes"], tuple(spec["hidden"]))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model
