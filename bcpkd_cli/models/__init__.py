"""Architectures by name: a plain dict of constructors. Each model has `features` and `head`.

Every constructor takes `(input_shape, n_classes, hidden)`; image models read the channel count
from `input_shape` (C, H, W) and ignore `hidden`. Every model maps its input to pooled, flattened
features [B, F] with `features` and to logits [B, n_classes] with the final `head` Linear, and
`forward(x) == head(features(x))`, which is how last-layer Laplace finds the last layer.

Families: `resnet` (kuangliu/pytorch-cifar ResNet-18/34/50), `resnet_cifar` (RepDistiller
resnet20/56, resnet8x4/32x4), `wrn` (RepDistiller WRN-16/40-1/2), `vgg` (RepDistiller vgg8/13
with BN), `mobilenetv2` (RepDistiller `mobile_half`). Any other network comes by name
(`torchvision:NAME`, `timm:NAME`, `module:callable`, `file.py:callable`; models/foreign.py) and is
split into the same `features` and `head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.data.text import is_text
from bcpkd_cli.models import huggingface, mobilenetv2, resnet, resnet_cifar, standalone, vgg, wrn
from bcpkd_cli.models.base import FeaturesHead
from bcpkd_cli.models.foreign import LIBRARIES, build_foreign, split_head


class VectorInput(nn.Module):
    """Feature vectors [B, D] -> standardised with the training split's per-feature mean and std (`stats`), so
    every stage feeds a model the raw data and the model applies the same statistics."""

    def __init__(self, stats: dict):
        super().__init__()
        self.register_buffer("mean", torch.tensor(stats["mean"]), persistent=False)
        self.register_buffer("std", torch.tensor(stats["std"]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """ReLU multilayer perceptron: features (input standardisation when `stats` are given, then all hidden
    layers) and a linear head."""

    def __init__(self, in_dim: int, n_classes: int, hidden: tuple[int, ...], stats: dict | None = None):
        super().__init__()
        layers: list[nn.Module] = [VectorInput(stats)] if stats is not None else []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x.flatten(1)))


def _mlp(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...],
         stats: dict | None = None) -> nn.Module:
    in_dim = 1
    for d in input_shape:
        in_dim *= d
    return MLP(in_dim, n_classes, tuple(hidden), stats)


CIFAR10_STATS = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}  # checkpoints from before
# the statistics of their data were stored
IMAGENET_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # torchvision's pretrained weights


class ImageInput(nn.Module):
    """uint8 images [B, C, H, W] (or floats in [0, 1]) -> floats normalised with channel statistics in [0, 1]
    units (`stats`: {"mean": [C], "std": [C]}: the training data's, ImageNet's or the user's; None: scaled to
    [0, 1] only, for networks that normalise themselves), so models take the raw store."""

    def __init__(self, stats: dict | None = CIFAR10_STATS):
        super().__init__()
        self.normalise = stats is not None
        if stats is not None:
            self.register_buffer("mean", torch.tensor(stats["mean"]).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(stats["std"]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        if self.normalise:
            x = (x - self.mean) / self.std
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # bf16 training: the channels_last layout of
            x = x.contiguous(memory_format=torch.channels_last)  # the weights (engine.prepare_for_device)
        return x


def _image(name: str, make: Callable[..., nn.Module]):
    """Adapt `make(n_classes, in_channels)` to the (input_shape, n_classes, hidden) signature."""

    def build(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...] = (),
              stats: dict | None = CIFAR10_STATS) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"{name} needs image inputs (C, H, W), got input_shape {tuple(input_shape)}")
        model = make(n_classes, in_channels=input_shape[0])
        model.features = nn.Sequential(ImageInput(stats), model.features)
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


class SplitModel(FeaturesHead):
    """A network from outside the zoo, split by models.foreign.split_head: features (image inputs normalised
    first) and its last linear layer as head."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features, self.head = features, head


def feature_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What `model.features` takes: MLP.forward flattens its inputs first; image models take them as they are."""
    return inputs.flatten(1) if isinstance(model, MLP) else inputs


HEAD_NAME = "head"  # the name of every model's last linear layer (last-layer Laplace)


def model_spec(arch: str, input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...],
               dropout: float = 0.0, arch_kwargs: dict | None = None, stats: dict | None = None,
               normalize: str | dict | bool = "data") -> dict:
    """The plain-value description of an architecture that checkpoints store: the architecture string and its
    keyword arguments (never code), and how its inputs are scaled (`input_scaling`): the name of the choice
    ("normalize") and the statistics its inputs are normalised with ("stats", None: none)."""
    name, used = input_scaling(normalize, stats, input_shape)
    spec = {"arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "input_shape": list(input_shape),
            "n_classes": n_classes, "hidden": list(hidden), "dropout": dropout, "stats": used, "normalize": name}
    if huggingface.is_hf(arch):  # its config and tokenizer, so that the checkpoint rebuilds it alone
        spec["hf"] = huggingface.describe(arch, n_classes, spec["arch_kwargs"])
    return spec


def input_scaling(normalize: str | dict | bool, stats: dict | None,
                  input_shape: tuple[int, ...]) -> tuple[str, dict | None]:
    """The name of an input scaling (teacher/distill.normalize) and the statistics it normalises with. Images,
    after scaling to [0, 1]: "data", the data's channel `stats` (CIFAR-10's when none are given); "imagenet";
    "none" (the network normalises itself); a {"mean", "std"} mapping: "custom". Vectors: their per-feature
    `stats` ("data"), none when there are none or with "none". True and False (older configs): data and none."""
    if isinstance(normalize, bool):
        normalize = "data" if normalize else "none"
    name = "custom" if isinstance(normalize, dict) else str(getattr(normalize, "value", normalize))
    if len(input_shape) != 3:
        return ("none", None) if name == "none" or stats is None else ("data", stats)
    used = {"data": stats or CIFAR10_STATS, "imagenet": IMAGENET_STATS, "none": None}.get(name)
    if name == "custom":
        used = {"mean": [float(v) for v in normalize["mean"]], "std": [float(v) for v in normalize["std"]]}
    if used is not None and not len(used["mean"]) == len(used["std"]) == input_shape[0]:
        raise BcpkdError(f"normalize: {len(used['mean'])} means and {len(used['std'])} standard deviations for "
                         f"{input_shape[0]}-channel images; give one of each per channel")
    return name, used


def scaling_name(spec: dict) -> str:
    """The input scaling a model_spec records ("data", "imagenet", "none" or "custom"); specs from before it was
    recorded normalised with their data's statistics unless they had none."""
    if "normalize" in spec:
        return spec["normalize"]
    return "data" if spec.get("stats", CIFAR10_STATS if len(spec["input_shape"]) == 3 else None) else "none"


def describe_inputs(spec: dict, key: str) -> str | None:
    """The line a run prints first about its image inputs (None for vectors): how they are scaled and the
    recipe key (`key`) that chooses it."""
    if len(spec["input_shape"]) != 3:
        return None
    name, stats = scaling_name(spec), spec.get("stats", CIFAR10_STATS)
    if stats is None:
        return f"inputs: images scaled to [0, 1], not normalised (the network normalises itself; {key}={name})"
    whose = {"data": "the training data's channel mean/std", "imagenet": "ImageNet's mean/std, as torchvision's "
             "pretrained weights expect"}.get(name, "the mean/std given")
    chosen = f"{key}={name}" if name != "custom" else f"{key}: a mapping"
    numbers = " std ".join(",".join(f"{v:.3f}" for v in stats[k]) for k in ("mean", "std"))
    return f"inputs: images scaled to [0, 1], normalised with {whose} ({chosen}; mean {numbers})"


def add_dropout(model: nn.Module, rate: float) -> None:
    """Dropout after every hidden ReLU of an MLP; on the pooled features (before the head) of an image model."""
    if isinstance(model, MLP):
        layers: list[nn.Module] = []
        for layer in model.features:
            layers += [layer, nn.Dropout(rate)] if isinstance(layer, nn.ReLU) else [layer]
        model.features = nn.Sequential(*layers)
    else:
        model.features = nn.Sequential(model.features, nn.Dropout(rate))


def build_model(spec: dict, state_dict: dict | None = None, init: tuple[str, dict, dict | None] | None = None
                ) -> nn.Module:
    """Build from a model_spec, optionally loading the weights of a bcpkd checkpoint (`state_dict`), or importing
    a trained network's (`init`: file name, state dict, and the spec of the bcpkd checkpoint it came from, if it
    did: see _init_state)."""
    arch, input_shape = spec["arch"], tuple(spec["input_shape"])
    # images of checkpoints that predate stored statistics were normalised with CIFAR-10's; vectors not at all
    stats = spec.get("stats", CIFAR10_STATS if len(input_shape) == 3 else None)
    if huggingface.is_hf(arch):
        pretrained = spec["arch_kwargs"].get("pretrained", True) and state_dict is None and init is None
        net, weights = huggingface.network(arch, spec["hf"], pretrained)
        if init is not None:
            load_weights(net, init[0], _init_state(spec, init[1], init[2]))
        model = huggingface.split(net, huggingface.tokenizer_of(spec["hf"]), arch)
        model.pretrained = weights
        if spec.get("dropout", 0.0) > 0.0:
            add_dropout(model, spec["dropout"])
    elif arch in ARCHITECTURES:
        model = ARCHITECTURES[arch](input_shape, spec["n_classes"], tuple(spec["hidden"]), stats=stats)
        if init is not None:
            load_weights(model, init[0], _init_state(spec, init[1], init[2]))
        if spec.get("dropout", 0.0) > 0.0:
            add_dropout(model, spec["dropout"])
    else:
        net = build_foreign(arch, spec["n_classes"], spec.get("arch_kwargs", {}))
        if init is not None:
            load_weights(net, init[0], _init_state(spec, init[1], init[2]))
        model = _rebuilt_from(net, spec)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def settle_pretrained(model: nn.Module, classes: tuple[str, ...]) -> str | None:
    """For a network built with pretrained weights (Hugging Face networks): put a loaded head's classes in the data's
    order (`huggingface.align_head`) and return the line that says what the weights gave; None where none were
    read."""
    if not isinstance(model, huggingface.TextClassifier) or model.pretrained is None:
        return None
    head = huggingface.align_head(model, classes)
    return model.pretrained.note + (f"; {head}" if head else "")


def bare_key_names(spec: dict) -> tuple[dict[str, str], str, str | None, str | None]:
    """bcpkd model key -> the key of the same tensor in the bare network: what `torchvision.models.NAME(
    num_classes=C)` (`timm.create_model`, the user's factory) loads with strict=True, or for built-ins the
    network in network.py (plain PyTorch). Also the naming, network.py's text and the call that builds it."""
    arch = spec["arch"]
    if arch == "mlp":
        bare = nn.Sequential()  # only its Linear layers' order matters: network.mlp's are 0, 2, 4, ...
        for i in range(len(spec["hidden"]) + 1):
            bare.add_module(str(2 * i), nn.Linear(1, 1))
        return (standalone.linear_names(build_model(spec), bare), "network.py", standalone.network_source(None),
                standalone.network_call(spec, None))
    if arch in _IMAGE:
        bare = _IMAGE[arch](spec["n_classes"], in_channels=spec["input_shape"][0])
        own = standalone.tensor_names(bare)
        bare.features = nn.Sequential(ImageInput(spec.get("stats")), bare.features)  # as build_model wraps it
        if spec.get("dropout", 0.0) > 0.0:
            add_dropout(bare, spec["dropout"])
        return (standalone.mapped_names(bare, own), "network.py", standalone.network_source(_IMAGE[arch]),
                standalone.network_call(spec, _IMAGE[arch]))
    if huggingface.is_hf(arch):
        net, _ = huggingface.network(arch, spec["hf"], pretrained=False)
        own = standalone.tensor_names(net)
        model = huggingface.split(net, huggingface.tokenizer_of(spec["hf"]), arch)
        if spec.get("dropout", 0.0) > 0.0:
            add_dropout(model, spec["dropout"])
        return standalone.mapped_names(model, own), "transformers", None, None
    net = build_foreign(arch, spec["n_classes"], spec.get("arch_kwargs", {}))
    own = standalone.tensor_names(net)
    model = _rebuilt_from(net, spec)  # build_model's construction: every tensor leads back to its library name
    library = arch.split(":", 1)[0]
    return standalone.mapped_names(model, own), library if library in LIBRARIES else "factory", None, None


@dataclass(frozen=True)
class LibraryWeights:
    """A checkpoint's network weights in the key names of what builds the bare network."""

    weights: dict  # key -> tensor
    names: str  # torchvision, timm, factory (the user's), or network.py (a built-in, as plain PyTorch)
    source: str | None  # network.py's text, for built-ins
    call: str | None  # the expression that builds the bare network from network.py


def library_state_dict(spec: dict, state_dict: dict) -> LibraryWeights:
    """A checkpoint's weights under the bare network's key names (`bare_key_names`)."""
    names, naming, source, call = bare_key_names(spec)
    return LibraryWeights(standalone.renamed(state_dict, names, spec["arch"]), naming, source, call)


def _init_state(spec: dict, state: dict, made_by: dict | None) -> dict:
    """--init weights in the names the network being built loads: a bcpkd checkpoint's (`made_by` its spec) or an
    export's model.safetensors (bare names) are renamed; a plain state dict is taken as it is."""
    if made_by is not None:
        state = library_state_dict(made_by, state).weights
    if spec["arch"] in ARCHITECTURES:  # built-ins load bcpkd's names: bare ones are renamed back
        inverse = {bare: ours for ours, bare in bare_key_names(spec)[0].items()}
        if set(state) and set(state) <= set(inverse) and not set(state) <= set(inverse.values()):
            state = {inverse[k]: v for k, v in state.items()}
    return state


def _rebuilt_from(net: nn.Module, spec: dict) -> nn.Module:
    """build_model's construction of a foreign network, around the given library network `net`."""
    input_shape = tuple(spec["input_shape"])
    stats = spec.get("stats", CIFAR10_STATS if len(input_shape) == 3 else None)
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    features, head = split_head(net, example, spec["arch"])
    if len(input_shape) == 3:
        features = nn.Sequential(ImageInput(stats), features)
    elif stats is not None:
        features = nn.Sequential(VectorInput(stats), features)
    model = SplitModel(features, head)
    if spec.get("dropout", 0.0) > 0.0:
        add_dropout(model, spec["dropout"])
    return model


def load_weights(network: nn.Module, source: str, state: dict) -> None:
    """Load a trained network's weights, all or nothing: missing or unexpected keys and shape mismatches are
    listed and refused."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        raise BcpkdError(f"--init {source}: does not fit this network ({'; '.join(problems)}); give the state dict "
                         f"of the same architecture and class count (and arch_kwargs)")
    network.load_state_dict(state)


# Examples per inference call by device type where bcpkd chooses (0). On a CPU large batches run slower per
# example (activations leave the caches): resnet56 inferred 319 images/s at 128 and 158 at 1024, resnet20 2.6-2.8x
# more at 128 than at 1024 (docs/benchmarks.md); a GPU wants larger ones.
INFERENCE_BATCH = {"cpu": 128, "cuda": 512}


def inference_batch_size(device: torch.device | str) -> int:
    """The automatic inference batch of this type of device (INFERENCE_BATCH; others as a CPU)."""
    return INFERENCE_BATCH.get(torch.device(device).type, INFERENCE_BATCH["cpu"])


@torch.inference_mode()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 0) -> torch.Tensor:
    """Logits [N, C] of an eval-mode model, computed in chunks of `batch_size` (0: `inference_batch_size` of the
    inputs' device)."""
    model.eval()
    batch_size = batch_size or inference_batch_size(getattr(inputs, "device", "cpu"))
    if is_text(inputs):
        batch_size = min(batch_size, TEXT_BATCH)
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


TEXT_BATCH = 256  # texts per inference call at most (a transformer's activations grow with batch x length^2)
