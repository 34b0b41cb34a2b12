"""Typed, frozen configuration of every stage: YAML recipe + `--set` overrides -> one Recipe.

Every field carries a one-line help text. All problems (unknown keys, bad values) are collected
and reported together before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bcpkd_cli.choices import (Arch, Bayes, CacheDtype, DatasetName, Hessian, Link, Optimizer, Precision, PriorMethod,
                               PriorTuning, Subset, Targets, Temper, TemperatureFit, ViewPadding, Centroids)
from bcpkd_cli.errors import BcpkdError


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    name: DatasetName = _f(DatasetName.synthetic, "dataset")
    root: str = _f("", "imagefolder: a folder with train/ and test/ class trees; cifar: the batches' folder; "
                       "arrays: a .npz, .safetensors or .csv file")
    image_size: int = _f(0, "images: decode every image once at S x S (shorter side resized to S, centre crop); "
                            "0: keep their size (all must share one)")
    label_column: str = _f("label", "arrays from a .csv: the column holding the integer class label")
    view_padding: ViewPadding = _f(ViewPadding.zeros, "images: how augmentation views pad before cropping: zeros, or "
                                                      "reflect (the authors' RandomCrop padding_mode)")
    standardize: bool = _f(True, "vector data (synthetic, arrays): models standardise every feature with the "
                                 "training split's mean and std (kept in each checkpoint)")
    download: bool = _f(False, "cifar10/100: download into root first (connected machines only)")
    n_train: int = _f(0, "training examples; 0: the default (synthetic 22,500; images: all left after held-out)")
    n_heldout: int = _f(-1, "held-out examples (carved from the training data, seeded); -1: the default (synthetic "
                            "2,500; files a tenth, at most 5,000); 0: none, when nothing is tuned on them")
    n_test: int = _f(0, "test examples; 0: the default (synthetic 10,000; images: the whole test split)")
    n_classes: int = _f(5, "synthetic: number of classes")
    dim: int = _f(30, "synthetic: input dimension")
    noise_var: float = _f(2.5, "synthetic: variance of the isotropic Gaussian noise")
    mean_choices: tuple[float, ...] = _f((4.0, 5.0, 6.0), "synthetic: values each mean coordinate is drawn from")
    seed: int = _f(0, "seed of the class means and of all three splits")


@dataclass(frozen=True)
class LaplaceConfig:
    subset: Subset = _f(Subset.last_layer, "weights under the posterior")
    hessian: Hessian = _f(Hessian.kron, "structure of the Hessian (GGN) approximation")
    prior: PriorMethod = _f(PriorMethod.marglik, "how train-teacher sets the prior precision")
    link: Link = _f(Link.probit, "predictive link approximation")
    samples: int = _f(100, "Monte Carlo samples for link=mc")
    grid_min: float = _f(-4.0, "grid search: log10 of the smallest prior precision")
    grid_max: float = _f(4.0, "grid search: log10 of the largest prior precision")
    grid_size: int = _f(21, "grid search: number of grid points")


@dataclass(frozen=True)
class VIConfig:
    samples: int = _f(20, "weight samples S averaged by the predictive")
    ml_epochs: int = _f(20, "first epochs without the KL term (maximum likelihood)")
    anneal_epochs: int = _f(20, "then epochs over which the KL weight rises linearly from 0 to 1")
    prior_sigma: float = _f(1.0, "standard deviation of the Gaussian prior over every weight")
    posterior_rho_init: float = _f(-3.0, "initial rho of the posterior, sigma = log(1 + exp(rho))")
    moped_delta: float = _f(0.1, "with teacher.base: posterior means start at the base weights, sigma = delta * |w|")


@dataclass(frozen=True)
class MCDropoutConfig:
    rate: float = _f(0.2, "dropout rate, in training and at prediction")
    samples: int = _f(20, "dropout masks S averaged by the predictive")


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = _f(5, "members M, trained with seeds seed, seed+1, ...")
    checkpoints: tuple[str, ...] = _f((), "assemble these deterministic teacher.pt files instead of training members")


@dataclass(frozen=True)
class MCMIConfig:
    weight: float = _f(0.25, "lambda in CE - lambda * CMI: > 0 maximises the conditional mutual information "
                             "(softer, more informative outputs, as the original work), < 0 minimises it (sharper)")
    epochs: int = _f(10, "fine-tuning epochs after the cross-entropy training (or from teacher.base)")
    lr_scale: float = _f(1.0, "fine-tuning learning rate as a multiple of teacher.lr")
    centroids: Centroids = _f(Centroids.epoch, "class centroids recomputed every fine-tuning epoch, or once before "
                                               "it (the authors' script)")
    cosine: bool = _f(False, "fine-tuning learning rate annealed on a cosine over its epochs (the authors' script)")


@dataclass(frozen=True)
class TeacherConfig:
    bayes: Bayes = _f(Bayes.none, "teacher kind")
    arch: str = _f("mlp", "architecture: a built-in name (mlp, resnet20, wrn_16_2, ...), torchvision:NAME, "
                          "timm:NAME, or your factory MODULE:CALLABLE or path/to/FILE.py:CALLABLE")
    arch_kwargs: dict = _f({}, "keyword arguments for the architecture's builder (besides num_classes)")
    normalize: bool = _f(True, "images: normalise inputs with the training data's channel statistics (false: "
                               "the network normalises itself)")
    init: str = _f("", "start from this trained network's weights (.safetensors, .pt or .pth state dict)")
    hidden: tuple[int, ...] = _f((256, 256), "hidden layer widths")
    epochs: int = _f(60, "training epochs")
    batch_size: int = _f(128, "training batch size")
    optimizer: Optimizer = _f(Optimizer.adam, "optimizer")
    lr: float = _f(1e-3, "learning rate")
    lr_milestones: tuple[int, ...] = _f((), "epochs after which the learning rate is multiplied by 0.1")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    seed: int = _f(0, "seed of initialisation and batch order")
    base: str = _f("", "existing deterministic teacher.pt to fit the posterior around instead of training")
    augment: bool = _f(True, "image data: train on a random pad-4 crop x flip view of each image every epoch")
    laplace: LaplaceConfig = _f(LaplaceConfig(), "Laplace approximation (bayes=laplace)")
    vi: VIConfig = _f(VIConfig(), "mean-field variational inference (bayes=vi)")
    mc_dropout: MCDropoutConfig = _f(MCDropoutConfig(), "Monte Carlo dropout (bayes=mc-dropout)")
    ensemble: EnsembleConfig = _f(EnsembleConfig(), "deep ensemble (bayes=ensemble)")
    mcmi: MCMIConfig = _f(MCMIConfig(), "cross-entropy training fine-tuned with a CMI term (bayes=mcmi)")


@dataclass(frozen=True)
class CalibrateConfig:
    prior: PriorTuning = _f(PriorTuning.gridsearch, "Laplace prior precision on held-out data: keep, marglik or gridsearch")
    temperature: TemperatureFit = _f(TemperatureFit.none, "fit a temperature on held-out NLL (any teacher)")
    temper: Temper = _f(Temper.logits, "how T_t tempers the targets: logits (each logit draw, or the logit "
                                       "distribution, divided by T_t; bcpkd's default) or predictive (the "
                                       "predictive p, then p^(1/T_t) renormalised; the authors' code)")
    draws: int = _f(0, "also keep the first K Monte Carlo draws of a sampling teacher per example and view "
                       "([N, V, K, C]; vi, mc-dropout, ensemble, laplace with link mc); 0: only their mean")
    cache_dtype: CacheDtype = _f(CacheDtype.float32, "dtype of the cached BCPs")
    views: int = _f(1, "augmentation views V cached per training image (1: no augmentation; at most 162)")
    batch_size: int = _f(1024, "inference batch size")


@dataclass(frozen=True)
class DistillConfig:
    arch: str = _f("mlp", "student architecture: a built-in name, torchvision:NAME, timm:NAME, or your factory "
                          "MODULE:CALLABLE or path/to/FILE.py:CALLABLE")
    arch_kwargs: dict = _f({}, "keyword arguments for the student architecture's builder (besides num_classes)")
    normalize: bool = _f(True, "images: normalise the student's inputs with the training data's channel "
                               "statistics (false: the network normalises itself)")
    init: str = _f("", "start the student from this trained network's weights (.safetensors, .pt or .pth)")
    hidden: tuple[int, ...] = _f((128, 128), "student hidden layer widths")
    targets: Targets = _f(Targets.teacher, "cached teacher BCPs, the teacher on every batch (online), onehot, "
                                           "true or noisy BCPs")
    alpha: float = _f(1.0, "weight of the KD term: 1 is pure distillation, 0 is one-hot training")
    t_teacher: float = _f(1.0, "teacher temperature T_t (divides the teacher's logits)")
    t_student: float = _f(1.0, "student temperature T_s")
    dirichlet_alpha: float = _f(5.0, "targets=noisy: concentration of Dirichlet(alpha * P)")
    draw: str = _f("mean", "a cache with draws (calibrate.draws): mean (their average), one (a seeded draw per "
                           "example per epoch: the online VI protocol at cached cost) or K (the mean of K of them)")
    few_shot: int = _f(0, "train the student on K seeded training examples per class (0: all of them)")
    epochs: int = _f(2, "training epochs")
    batch_size: int = _f(8, "training batch size")
    optimizer: Optimizer = _f(Optimizer.sgd, "optimizer")
    lr: float = _f(0.01, "learning rate")
    lr_milestones: tuple[int, ...] = _f((), "epochs after which the learning rate is multiplied by 0.1")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    seed: int = _f(0, "seed of initialisation and noisy targets (and of the data order unless data_seed is set)")
    data_seed: int = _f(-1, "seed of batch order, view draws and few-shot subset (-1: distill.seed); students "
                            "trained in lockstep share it")
    log_every: int = _f(100, "steps between held-out loss/accuracy log entries")


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int = _f(15, "equal-width confidence bins of the ECE")
    batch_size: int = _f(4096, "inference batch size")
    grad_targets: tuple[str, ...] = _f((), "students: also measure gradient noise against onehot, true, noisy:ALPHA")


@dataclass(frozen=True)
class ExperimentConfig:
    teachers: dict = _f({}, "bcpkd run: name -> overrides of the teacher section (`base: NAME` names another teacher)")
    students: dict = _f({}, "bcpkd run: name -> overrides of the distill section (plus `teacher: NAME`)")
    seeds: tuple[int, ...] = _f((0,), "bcpkd run: student seeds")
    workers: int = _f(1, "bcpkd run: students trained in parallel processes (one CPU thread each when > 1)")
    reported: dict = _f({}, "bcpkd run: student name -> the paper's reported test accuracy in percent, printed beside "
                            "the measured mean")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = _f(False, "write training curves and final metrics for TensorBoard under <run folder>/"
                                  "tensorboard (needs the tensorboard extra)")
    line_seconds: float = _f(60.0, "batch jobs (stderr not a terminal): a progress line at least this often, "
                                   "besides one per epoch")


@dataclass(frozen=True)
class Recipe:
    out: str = _f("", "output folder (default: runs/<stage>-<time>)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: Precision = _f(Precision.auto, "training arithmetic: auto (bf16 autocast and channels_last on CUDA, "
                                              "float32 on CPU) or float32 everywhere; caches are always float32")
    compile: bool = _f(False, "torch.compile the training forward pass (worth it for long GPU runs)")
    data: DataConfig = _f(DataConfig(), "data")
    teacher: TeacherConfig = _f(TeacherConfig(), "train-teacher")
    calibrate: CalibrateConfig = _f(CalibrateConfig(), "calibrate and BCP cache")
    distill: DistillConfig = _f(DistillConfig(), "distill")
    evaluate: EvaluateConfig = _f(EvaluateConfig(), "evaluate")
    experiment: ExperimentConfig = _f(ExperimentConfig(), "bcpkd run only")
    log: LogConfig = _f(LogConfig(), "progress lines and TensorBoard")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_FOREIGN = re.compile(r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*$")  # torchvision:NAME, timm:NAME, MODULE:CALLABLE, FILE.py:...
BUILT_IN = tuple(a.value for a in Arch)
_GRAD_TARGET = re.compile(r"^(onehot|true|noisy:\d+(\.\d+)?)$")
_POSITIVE = {"n_classes", "dim", "batch_size", "prior_sigma", "lr_scale",
             "samples", "grid_size", "log_every", "ece_bins", "noise_var", "lr", "dirichlet_alpha",
             "t_teacher", "t_student", "workers", "hidden", "line_seconds"}


def _convert(value: Any, typ: Any, where: str, errors: list[str]) -> Any:
    """Convert one YAML/CLI value to the field's type, appending a message on failure."""
    if value is None and typ is str:
        return ""  # YAML `null` for a path or name means "not set"
    if isinstance(value, bool) and typ is not bool:
        value = str(value).lower()  # YAML reads `true` as a boolean: `targets: true` means the string
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return typ()
        return _build(typ, value, where, errors)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        try:
            return typ(str(value))
        except ValueError:
            choices = ", ".join(m.value for m in typ)
            errors.append(f"{where}: {value!r} is not one of: {choices}")
            return None
    if origin is tuple:
        (item_type, _) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {value!r}")
            return ()
        return tuple(_convert(v, item_type, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if typ is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        errors.append(f"{where}: expected true or false, got {value!r}")
        return False
    try:
        if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        converted = typ(value)
    except (TypeError, ValueError):
        errors.append(f"{where}: expected {typ.__name__}, got {value!r}")
        return None
    return converted


def _build(cls: type, values: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            errors.append(f"{prefix}.{key}: unknown key (valid: {', '.join(sorted(names))})".lstrip("."))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        where = f"{prefix}.{f.name}".lstrip(".")
        value = _convert(values[f.name], hints[f.name], where, errors)
        values_to_check = value if isinstance(value, tuple) else (value,)
        if f.name in _POSITIVE and any(isinstance(v, (int, float)) and v <= 0 for v in values_to_check):
            errors.append(f"{where}: must be positive, got {value!r}")
        if value is not None:
            kwargs[f.name] = value
    return cls(**kwargs)


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise BcpkdError(f"--set {dotted}: {p} is not a section")
    node[leaf] = value


def parse_set(items: list[str]) -> dict:
    """Turn `--set a.b=value` items into a nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise BcpkdError(f"--set {item!r}: expected section.key=value, e.g. --set distill.alpha=0.5")
        key, raw = item.split("=", 1)
        set_path(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def parse_sweep(items: list[str]) -> list[dict]:
    """`--sweep alpha=0.5,1 --sweep seed=0,1` -> one distill override per point of the product grid,
    in order: [{"alpha": 0.5, "seed": 0}, {"alpha": 0.5, "seed": 1}, ...]."""
    hints = typing.get_type_hints(DistillConfig)
    names = sorted(name for name, hint in hints.items() if typing.get_origin(hint) is not tuple)
    axes: list[tuple[str, list]] = []
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip().removeprefix("distill.")
        if key not in names or not raw:
            raise BcpkdError(f"--sweep {item!r}: expected a distill key and its values, e.g. --sweep alpha=0.5,1.0 "
                             f"(keys: {', '.join(names)}; list-valued keys cannot be swept)")
        if key in (k for k, _ in axes):
            raise BcpkdError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        try:
            axes.append((key, [yaml.safe_load(v) for v in raw.split(",")]))
        except yaml.YAMLError:
            raise BcpkdError(f"--sweep {item!r}: values must be plain numbers or words separated by commas") from None
    grid: list[dict] = [{}]
    for key, values in axes:
        grid = [{**point, key: v} for point in grid for v in values]
    return grid


def merge(base: dict, override: dict) -> dict:
    """Deep merge of plain dicts: `override` wins."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path | None) -> dict:
    """The raw dict of a YAML recipe (empty when no recipe is given)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise BcpkdError(f"recipe {path}: no such file (list recipes with: ls recipes/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise BcpkdError(f"recipe {path}: not valid YAML{at}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise BcpkdError(f"recipe {path}: expected a mapping of sections (data, teacher, distill, ...)")
    return tree


Check = typing.Callable[[Recipe], "list[str]"]  # more rules on a typed recipe, e.g. a teacher kind's own


def build_recipe(tree: dict, source: str = "recipe", checks: typing.Sequence[Check] = ()) -> Recipe:
    """Validate a raw dict into a Recipe, reporting every problem (and those of `checks`) at once."""
    errors: list[str] = []
    recipe = _build(Recipe, tree, "", errors)
    if not _DEVICE.match(recipe.device):
        errors.append(f"device: {recipe.device!r} is not one of: auto, cpu, cuda, cuda:N")
    if not 0.0 <= recipe.distill.alpha <= 1.0:
        errors.append(f"distill.alpha: must be in [0, 1], got {recipe.distill.alpha}")
    for where, items in (("data.mean_choices", recipe.data.mean_choices), ("experiment.seeds", recipe.experiment.seeds)):
        if not items:
            errors.append(f"{where}: must not be empty")
    if not 1 <= recipe.calibrate.views <= 162:
        errors.append(f"calibrate.views: must lie in 1..162 (pad-4 crop x flip), got {recipe.calibrate.views}")
    if recipe.data.name == DatasetName.synthetic and recipe.calibrate.views != 1:
        errors.append("calibrate.views: the synthetic dataset has no augmentation views; use 1")
    if recipe.distill.few_shot < 0:
        errors.append(f"distill.few_shot: must be 0 (all) or positive, got {recipe.distill.few_shot}")
    if recipe.data.n_heldout < -1:
        errors.append(f"data.n_heldout: must be -1 (the default), 0 (none) or positive, got {recipe.data.n_heldout}")
    for key in ("n_train", "n_test"):
        if getattr(recipe.data, key) < 0:
            errors.append(f"data.{key}: must be 0 (the default) or positive, got {getattr(recipe.data, key)}")
    if recipe.data.name != DatasetName.synthetic and not recipe.data.root:
        errors.append(f"data.root: dataset {recipe.data.name.value} needs a folder or file, e.g. --data-root /data/cifar")
    images = recipe.data.name not in (DatasetName.synthetic, DatasetName.arrays)
    for where, arch in (("teacher.arch", recipe.teacher.arch), ("distill.arch", recipe.distill.arch)):
        if not (arch in BUILT_IN or _FOREIGN.match(arch)):
            errors.append(f"{where}: {arch!r} is not a built-in architecture ({', '.join(BUILT_IN)}) nor "
                          f"torchvision:NAME, timm:NAME, MODULE:CALLABLE or FILE.py:CALLABLE")
        elif not images and (arch in BUILT_IN and arch != "mlp" or arch.startswith("torchvision:")):
            errors.append(f"{where}: {arch} needs image data; {recipe.data.name.value} data takes mlp or your own "
                          f"factory")
    for where, epochs in (("teacher.epochs", recipe.teacher.epochs), ("distill.epochs", recipe.distill.epochs),
                          ("teacher.mcmi.epochs", recipe.teacher.mcmi.epochs)):
        if epochs < 0 or (epochs == 0 and where == "teacher.mcmi.epochs"):
            errors.append(f"{where}: must be {'positive' if 'mcmi' in where else '0 (train nothing) or positive'}, "
                          f"got {epochs}")
    if not re.fullmatch(r"mean|one|[1-9]\d*", recipe.distill.draw):
        errors.append(f"distill.draw: {recipe.distill.draw!r} is not mean, one or a number of draws K")
    elif recipe.distill.draw not in ("mean", "one") and int(recipe.distill.draw) > max(recipe.calibrate.draws, 1):
        errors.append(f"distill.draw: {recipe.distill.draw} draws, but the cache keeps calibrate.draws="
                      f"{recipe.calibrate.draws}; raise calibrate.draws")
    if recipe.calibrate.draws < 0:
        errors.append(f"calibrate.draws: must be 0 or positive, got {recipe.calibrate.draws}")
    if recipe.data.image_size < 0:
        errors.append(f"data.image_size: must be 0 (keep the size) or positive, got {recipe.data.image_size}")
    for item in recipe.evaluate.grad_targets:
        if not _GRAD_TARGET.match(item):
            errors.append(f"evaluate.grad_targets: {item!r} is not one of: onehot, true, noisy:ALPHA")
    errors += _teacher_problems(recipe.teacher)
    errors += [problem for check in checks for problem in check(recipe)]  # bad values were left at their defaults
    if errors:
        raise BcpkdError(f"{source}: {len(errors)} problem(s): " + "; ".join(errors))
    return recipe


def _teacher_problems(cfg: TeacherConfig) -> list[str]:
    """Values no teacher kind accepts (a kind's own rules live with its class: teachers.recipe_problems)."""
    errors = []
    if not 0.0 < cfg.mc_dropout.rate < 1.0:
        errors.append(f"teacher.mc_dropout.rate: must lie in (0, 1), got {cfg.mc_dropout.rate}")
    for key in ("ml_epochs", "anneal_epochs"):
        if getattr(cfg.vi, key) < 0:
            errors.append(f"teacher.vi.{key}: must be 0 or positive, got {getattr(cfg.vi, key)}")
    if cfg.vi.moped_delta < 0:
        errors.append(f"teacher.vi.moped_delta: must be 0 or positive, got {cfg.vi.moped_delta}")
    if cfg.ensemble.members < 2:
        errors.append(f"teacher.ensemble.members: an ensemble needs at least 2, got {cfg.ensemble.members}")
    return errors


def recipe_for_checkpoint(tree: dict, checkpoint: dict, source: str = "recipe",
                          checks: typing.Sequence[Check] = ()) -> Recipe:
    """A recipe whose data section defaults to the data the checkpoint was made from."""
    return build_recipe(merge({"data": checkpoint["data"]["config"]}, tree), source, checks)


def config_field(dotted: str) -> dataclasses.Field:
    """The field of a dotted recipe key (`teacher.laplace.hessian`): its default and one-line help."""
    cls: Any = Recipe
    *sections, leaf = dotted.split(".")
    for name in sections:
        cls = typing.get_type_hints(cls)[name]
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


SYNTHETIC_ONLY = ("n_classes", "dim", "noise_var", "mean_choices")  # data keys that only the synthetic set reads
UNUSED_DATA_KEYS = {
    DatasetName.synthetic: ("root", "download", "image_size", "label_column", "view_padding"),
    DatasetName.arrays: (*SYNTHETIC_ONLY, "download", "image_size", "view_padding"),
    DatasetName.imagefolder: (*SYNTHETIC_ONLY, "label_column", "download", "standardize"),
    DatasetName.cifar10: (*SYNTHETIC_ONLY, "label_column", "standardize"),
    DatasetName.cifar100: (*SYNTHETIC_ONLY, "label_column", "standardize"),
}


def plain_data(cfg: DataConfig) -> dict:
    """The data section as plain values, without the keys its dataset does not read (an image folder's
    config does not claim `n_classes: 5`)."""
    unused = UNUSED_DATA_KEYS[cfg.name]
    return {k: v for k, v in to_plain(cfg).items() if k not in unused}


# What an artifact's stored config holds: the sections that made it (and `calibrate` for a calibrated teacher
# and for a student of a teacher).
RUN_KEYS = ("out", "device", "precision", "compile")
TEACHER_RECORD = (*RUN_KEYS, "data", "teacher", "log")
STUDENT_RECORD = (*RUN_KEYS, "data", "distill", "log")


def recipe_record(recipe: Recipe, sections: typing.Iterable[str]) -> dict:
    """The plain config an artifact stores: only the top-level keys and sections that made it (its data
    section without the keys its dataset does not read); a valid recipe for `--recipe`."""
    plain = to_plain(recipe)
    return {k: plain_data(recipe.data) if k == "data" else plain[k] for k in sections}


def to_plain(obj: Any) -> Any:
    """A dataclass/enum tree as plain Python values (for YAML, JSON and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
