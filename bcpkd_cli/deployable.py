"""A checkpoint as a classifier for the user's code: raw inputs -> logits and probabilities in one module, with
its class names and the preprocessing its inputs need.

A student is its network and a softmax. A teacher is its calibrated predictive where that is a deterministic
function of the input (teachers/deployed.py: Laplace probit, ensembles, temperature, single networks), else its
mean network or K fixed seeded draws (VI, MC dropout), and says which. Images go in as float32 RGB in [0, 1]
[B, 3, H, W] (normalised inside); feature rows as float32 [B, D] (standardised inside).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bcpkd_cli import artifacts
from bcpkd_cli.data.decode import decode_file, square
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, scaling_name
from bcpkd_cli.teachers import load_teacher


class _Softmaxed(nn.Module):
    """A network -> (logits [B, C], probs [B, C])."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network(x)
        return logits, torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class Preprocess:
    """How a raw input becomes what the classifier takes (plain values, also written to bcpkd-export.json)."""

    kind: str  # "image" or "features"
    shape: tuple[int, ...]  # one input: (3, H, W) or (D,)
    image_size: int  # images: every image resized (shorter side) and centre-cropped to S x S; 0: taken as it is
    normalize: str  # what the classifier does inside: data, imagenet, none, custom (images); standardize (rows)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, item) -> torch.Tensor:
        """An image file (any kind bcpkd reads) or uint8 [3, H, W] tensor -> float32 [3, H, W] in [0, 1]; a feature
        row (sequence or tensor) -> float32 [D]."""
        if self.kind == "features":
            return torch.as_tensor(item, dtype=torch.float32).reshape(self.shape)
        image = decode_file(Path(item)) if isinstance(item, (str, Path)) else torch.as_tensor(item)
        if self.image_size:
            image = square(image, self.image_size)
        if tuple(image.shape) != tuple(self.shape):
            raise BcpkdError(f"{item if isinstance(item, (str, Path)) else 'image'}: {image.shape[2]}x{image.shape[1]} "
                             f"pixels; this model takes {self.shape[2]}x{self.shape[1]} (its data were not resized: "
                             f"resize the image first)")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()

    def record(self) -> dict:
        rule = f"shorter side resized to {self.image_size} (antialiased bilinear), centre crop {self.image_size} x " \
               f"{self.image_size}" if self.image_size else "taken at the training images' size, not resized"
        if self.kind == "features":
            return {"kind": "features", "shape": list(self.shape), "dtype": "float32",
                    "standardize": {"mean": list(self.mean), "std": list(self.std)} if self.mean else None}
        return {"kind": "image", "shape": list(self.shape), "dtype": "float32", "channels": "RGB", "range": [0, 1],
                "resize": rule, "image_size": self.image_size,
                "normalize": {"choice": self.normalize, "mean": list(self.mean) if self.mean else None,
                              "std": list(self.std) if self.std else None, "where": "inside the model"}}


def preprocess_of(payload: dict) -> Preprocess:
    """The preprocessing of a checkpoint's inputs, from its model spec and data config."""
    spec, data = payload["model"], payload["data"]["config"]
    stats = spec.get("stats") or {}
    mean, std = tuple(stats.get("mean") or ()) or None, tuple(stats.get("std") or ()) or None
    shape = tuple(spec["input_shape"])
    if len(shape) != 3:
        return Preprocess("features", shape, 0, "standardize" if mean else "none", mean, std)
    return Preprocess("image", shape, int(data.get("image_size", 0) or 0), scaling_name(spec), mean, std)


@dataclass(frozen=True)
class Deployable:
    """What export, predict and load hand on: the module, its class names and preprocessing, and what it is."""

    module: nn.Module  # float32 inputs [B, ...] -> (logits [B, C], probs [B, C][, epistemic [B]]), eval mode
    classes: list[str]
    preprocess: Preprocess
    kind: str  # "student" or "teacher"
    predictive: str  # what the probabilities are, one line
    exact: bool  # they equal the checkpoint's own predictive (a student's softmax, a teacher's calibrated one)
    epistemic: str | None  # the third output's name, if there is one
    payload: dict


def class_names(payload: dict) -> list[str]:
    """The checkpoint's class names (label order); "0".."C-1" for checkpoints from before they were stored."""
    return list(payload["data"].get("classes") or [str(c) for c in range(payload["model"]["n_classes"])])


def deployable(path: str | Path, draws: int = 0, device: torch.device | str = "cpu") -> Deployable:
    """A student.pt or teacher.pt (or its folder) as a Deployable; `draws` K: a sampling teacher as K fixed
    seeded draws instead of its mean network."""
    path = artifacts.resolve_checkpoint(path, (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT), "MODEL")
    payload = artifacts.load_checkpoint(path, (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT))
    if payload["format"] == artifacts.STUDENT_FORMAT:
        if draws:
            raise BcpkdError("--draws: a student is one network; draws apply to vi and mc-dropout teachers")
        network = build_model(payload["model"], payload["state_dict"]).to(device).eval()
        return Deployable(_Softmaxed(network).eval(), class_names(payload), preprocess_of(payload), "student",
                          "softmax(logits) of the student network", True, None, payload)
    deployed = load_teacher(payload, torch.device(device)).deployable(draws)
    return Deployable(deployed.module.eval(), class_names(payload), preprocess_of(payload), "teacher",
                      deployed.predictive, deployed.exact, deployed.epistemic, payload)


class Classifier(nn.Module):
    """A model for the user's code: raw inputs (after `preprocess`) [B, ...] -> probabilities [B, C], in eval mode,
    with `.classes` (names in label order) and `.preprocess` (a file path, uint8 image or feature row -> one
    input)."""

    def __init__(self, deployed: Deployable):
        super().__init__()
        self.core = deployed.module
        self.classes = deployed.classes
        self.preprocess = deployed.preprocess
        self.predictive = deployed.predictive
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)[1]


def load(path: str | Path, draws: int = 0, device: torch.device | str = "cpu") -> Classifier:
    """A student.pt or teacher.pt (a teacher: its calibrated predictive) as a `Classifier`."""
    return Classifier(deployable(path, draws, device))
