"""A checkpoint as a classifier for the user's code: raw inputs -> logits and probabilities in one module, with
its class names and the preprocessing its inputs need.

A student is its network and a softmax. A teacher is its calibrated predictive where that is a deterministic
function of the input (teachers/deployed.py: Laplace probit, ensembles, temperature, single networks), else its
mean network or K fixed seeded draws (VI, MC dropout), and says which. Images go in as float32 RGB in [0, 1]
[B, 3, H, W] (normalised inside); feature rows as float32 [B, D] (standardised inside); text as the model's own
tokenizer's ids, a dict of int64 input_ids, attention_mask (and token_type_ids) [B, L], truncated at data.max_length
and padded per batch as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bcpkd_cli import artifacts
from bcpkd_cli.data.decode import decode_file, square
from bcpkd_cli.data.text import Corpus, TextRows
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, scaling_name
from bcpkd_cli.models.huggingface import TextFeatures
from bcpkd_cli.teachers import load_teacher


class Softmaxed(nn.Module):
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

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Preprocessed inputs -> one batch [B, ...]."""
        return torch.stack(items)

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


@dataclass(frozen=True)
class TextPreprocess:
    """How texts become what a text classifier takes: its own tokenizer's ids, truncated at data.max_length and
    padded to the longest text of each batch, exactly as in training."""

    tokenizer: object  # a transformers fast tokenizer
    max_length: int
    inputs: tuple[str, ...]  # the token tensors the classifier takes, in order
    text_column: str  # the data's columns, for tables given to predict
    pair_column: str  # "": one text per example; else the column of the second text of sentence pairs
    kind: str = "text"

    def __call__(self, item) -> tuple[str, str | None]:
        """A text (sentence pairs: a (text, second text) pair, or one string with a tab between) -> (text, second
        text or None)."""
        text, pair = item if isinstance(item, (tuple, list)) else (item, None)
        if pair is not None and not self.pair_column:
            raise BcpkdError("a second text: this model classifies single texts, give one")
        if self.pair_column and pair is None:
            text, _, pair = str(text).partition("\t")
            if not pair.strip():
                raise BcpkdError("no second text: this model classifies sentence pairs, a tab between the two")
        if not str(text).strip():
            raise BcpkdError("empty text")
        return str(text), str(pair) if self.pair_column else None

    def collate(self, items: list[tuple[str, str | None]]) -> dict[str, torch.Tensor]:
        """Preprocessed texts -> the batch's token tensors [B, L] (int64)."""
        corpus = Corpus([t for t, _ in items], [p for _, p in items] if self.pair_column else None, self.max_length,
                        None)
        encoded = TextRows(corpus, torch.arange(len(items))).encode(self.tokenizer)
        return {name: encoded[name] for name in self.inputs}

    def record(self) -> dict:
        return {"kind": "text", "inputs": list(self.inputs), "dtype": "int64", "max_length": self.max_length,
                "truncation": f"at {self.max_length} tokens", "padding": "to the longest text of the batch",
                "text_column": self.text_column, "text_pair_column": self.pair_column or None}


def model_input(inputs, preprocess: Preprocess | TextPreprocess):
    """Some of a split's inputs as the deployed module takes them: float32 images in [0, 1] or feature rows, or the
    text rows' token tensors."""
    if preprocess.kind == "text":
        encoded = inputs.encode(preprocess.tokenizer)
        return {name: encoded[name] for name in preprocess.inputs}
    return inputs.float() / 255.0 if inputs.dtype == torch.uint8 else inputs.float()


def text_preprocess(features: TextFeatures, data: dict) -> TextPreprocess:
    """The preprocessing of a text classifier (`features`: its TextFeatures) trained on data config `data`."""
    pair = data.get("text_pair_column") or ""
    tokens = "token_type_ids" in features.tokenizer.model_input_names or bool(pair)  # as Corpus encodes
    inputs = ("input_ids", "attention_mask") + (("token_type_ids",) if tokens and features.takes_types else ())
    return TextPreprocess(features.tokenizer, int(data.get("max_length") or 128), inputs,
                          data.get("text_column") or "text", pair)


def preprocess_of(payload: dict, module: nn.Module) -> Preprocess | TextPreprocess:
    """The preprocessing of a checkpoint's inputs, from its model spec and data config (text: from the tokenizer of
    the text network in `module`)."""
    spec, data = payload["model"], payload["data"]["config"]
    features = next((m for m in module.modules() if isinstance(m, TextFeatures)), None)
    if features is not None:
        return text_preprocess(features, data)
    stats = spec.get("stats") or {}
    mean, std = tuple(stats.get("mean") or ()) or None, tuple(stats.get("std") or ()) or None
    shape = tuple(spec["input_shape"])
    if len(shape) != 3:
        return Preprocess("features", shape, 0, "standardize" if mean else "none", mean, std)
    return Preprocess("image", shape, int(data.get("image_size", 0) or 0), scaling_name(spec), mean, std)


@dataclass(frozen=True)
class Deployable:
    """What export, predict and load hand on: the module, its class names and preprocessing, and what it is."""

    module: nn.Module  # inputs [B, ...] (model_input) -> (logits [B, C], probs [B, C][, epistemic [B]]), eval mode
    classes: list[str]
    preprocess: Preprocess | TextPreprocess
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
        return Deployable(Softmaxed(network).eval(), class_names(payload), preprocess_of(payload, network),
                          "student", "softmax(logits) of the student network", True, None, payload)
    deployed = load_teacher(payload, torch.device(device)).deployable(draws)
    return Deployable(deployed.module.eval(), class_names(payload), preprocess_of(payload, deployed.module),
                      "teacher", deployed.predictive, deployed.exact, deployed.epistemic, payload)


class Classifier(nn.Module):
    """A model for the user's code: raw inputs (after `preprocess`) [B, ...], or a list of raw items (image files,
    feature rows, texts), -> probabilities [B, C], in eval mode, with `.classes` (names in label order) and
    `.preprocess` (a file path, uint8 image, feature row or text -> one input; `.preprocess.collate` batches them)."""

    def __init__(self, deployed: Deployable):
        super().__init__()
        self.core = deployed.module
        self.classes = deployed.classes
        self.preprocess = deployed.preprocess
        self.predictive = deployed.predictive
        self.eval().requires_grad_(False)

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = self.preprocess.collate([self.preprocess(item) for item in x])
        return self.core(x)[1]


def load(path: str | Path, draws: int = 0, device: torch.device | str = "cpu") -> Classifier:
    """A student.pt or teacher.pt (a teacher: its calibrated predictive) as a `Classifier`."""
    return Classifier(deployable(path, draws, device))
