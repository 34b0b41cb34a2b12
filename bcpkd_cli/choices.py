"""The choices of the configuration: str-Enums, so that `--help` and error messages list them."""

from __future__ import annotations

import enum


class DatasetName(str, enum.Enum):
    synthetic = "synthetic"
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    imagefolder = "imagefolder"
    arrays = "arrays"
    text = "text"
    hf = "hf"


class Arch(str, enum.Enum):
    mlp = "mlp"
    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"
    resnet20 = "resnet20"
    resnet56 = "resnet56"
    resnet8x4 = "resnet8x4"
    resnet32x4 = "resnet32x4"
    wrn_16_1 = "wrn_16_1"
    wrn_16_2 = "wrn_16_2"
    wrn_40_1 = "wrn_40_1"
    wrn_40_2 = "wrn_40_2"
    vgg8 = "vgg8"
    vgg13 = "vgg13"
    mobilenetv2 = "mobilenetv2"


class Bayes(str, enum.Enum):
    none = "none"
    laplace = "laplace"
    vi = "vi"
    mc_dropout = "mc-dropout"
    ensemble = "ensemble"
    temperature = "temperature"
    mse = "mse"
    mcmi = "mcmi"


def teacher_label(kind: Bayes | str) -> str:
    """What logs call a teacher of this kind: `laplace teacher`; kind `none` (no posterior) is a deterministic one."""
    kind = Bayes(kind)
    return f"{'deterministic' if kind == Bayes.none else kind.value} teacher"


class Subset(str, enum.Enum):
    last_layer = "last_layer"
    all = "all"


class Hessian(str, enum.Enum):
    diag = "diag"
    kron = "kron"
    full = "full"


class PriorMethod(str, enum.Enum):
    marglik = "marglik"
    gridsearch = "gridsearch"


class PriorTuning(str, enum.Enum):
    keep = "keep"
    marglik = "marglik"
    gridsearch = "gridsearch"


class Link(str, enum.Enum):
    probit = "probit"
    mc = "mc"


class TemperatureFit(str, enum.Enum):
    none = "none"
    fit = "fit"


class Optimizer(str, enum.Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(str, enum.Enum):
    """How the learning rate moves over a training run (optim.make_schedule)."""
    step = "step"
    cosine = "cosine"
    linear = "linear"


class Targets(str, enum.Enum):
    teacher = "teacher"
    online = "online"
    onehot = "onehot"
    true = "true"
    noisy = "noisy"


TARGET_LABELS = {"onehot": "one-hot labels", "true": "exact BCPs", "noisy": "noisy BCPs"}  # what logs call them


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 autocast on CUDA, float32 on a CPU
    float32 = "float32"
    bf16 = "bf16"  # bf16 autocast on any device (CPUs with bf16 units)


class CacheDtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"


class Temper(str, enum.Enum):
    logits = "logits"
    predictive = "predictive"


class Crop(str, enum.Enum):
    pad = "pad"
    resized = "resized"


class Decode(str, enum.Enum):
    store = "store"
    stream = "stream"


class ViewPadding(str, enum.Enum):
    zeros = "zeros"
    reflect = "reflect"


class Centroids(str, enum.Enum):
    epoch = "epoch"
    once = "once"


class Normalize(str, enum.Enum):
    """How image inputs are normalised after scaling to [0, 1] (a {mean, std} mapping is the other choice)."""
    data = "data"
    imagenet = "imagenet"
    none = "none"


class ExportFormat(str, enum.Enum):
    """What `bcpkd export` writes: ONNX, a torch.export program, the weights in the source library's names, a
    Hugging Face folder (save_pretrained of an `hf:` network and its tokenizer)."""
    onnx = "onnx"
    pt2 = "pt2"
    safetensors = "safetensors"
    hf = "hf"
