"""The configuration's schema: one frozen dataclass per section, every field with a default and one line of
help, and the plain-value views of a recipe that artifacts store. Parsing and validation: config.py."""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any

from bcpkd_cli.choices import (Bayes, CacheDtype, Centroids, DatasetName, Hessian, Link, Normalize, Optimizer,
                               Precision, PriorMethod, PriorTuning, Schedule, Subset, Targets, Temper, TemperatureFit,
                               ViewPadding, Crop, Decode)


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


DEFAULT_ARCH = {"images": "resnet20", "vectors": "mlp", "text": ""}  # an architecture left unset follows the data (config.py)


def _arch(help: str) -> Any:
    """An architecture field: unset ("") until the recipe is built, then the default of its data's kind."""
    return field(default="", metadata={"help": help, "default": ", ".join(f"{arch} for {kind}" for kind, arch
                                                                         in DEFAULT_ARCH.items() if arch)})


@dataclass(frozen=True)
class DataConfig:
    name: DatasetName = _f(DatasetName.synthetic, "dataset; left out, data.root names it: a folder with train/ "
                                                  "(imagefolder), cifar-10-batches-py/ (cifar10), cifar-100-python/ "
                                                  "(cifar100), a .csv, .npz or .safetensors file (arrays), a .csv/.tsv/.jsonl/.parquet "
                                                  "file or folder of them with text (text); hf: a datasets name")
    root: str = _f("", "imagefolder: a folder with train/ and test/ class trees; cifar: the batches' folder; "
                       "arrays: a .npz, .safetensors or .csv file; text: a .csv/.tsv/.jsonl/.parquet file or a "
                       "folder with train.* and test.*; hf: a datasets name (glue/sst2) or folder")
    image_size: int = _f(0, "images: decode every image once at S x S (shorter side resized to S, centre crop); "
                            "0: keep their size (all must share one)")
    label_column: str = _f("label", "arrays from a .csv, text: the column holding the class label (integers "
                                    "0..C-1, or names: classes are then the sorted names)")
    text_column: str = _f("text", "text: the column holding each example's text")
    text_pair_column: str = _f("", "text: the column holding the second text of sentence pairs (empty: none)")
    max_length: int = _f(128, "text: tokens per example at most (longer ones are truncated); batches are padded "
                              "to their own longest example")
    skip_unreadable: bool = _f(False, "image folders: leave out the files that cannot be decoded (listed, counted "
                                      "and recorded in the data fingerprint) instead of refusing them")
    view_padding: ViewPadding = _f(ViewPadding.zeros, "images: how augmentation views pad before cropping: zeros, or "
                                                      "reflect (the authors' RandomCrop padding_mode)")
    crop: Crop = _f(Crop.pad, "images: augmentation views: pad (CIFAR's padded crop x flip) or resized "
                              "(ImageNet's random-resized crop x flip, resized back to the image size)")
    decode: Decode = _f(Decode.store, "images: store (decode once into a uint8 store; memory-mapped when large) or "
                                      "stream (decode the files of every batch, in worker processes)")
    loader_workers: int = _f(0, "images: worker processes that decode (stream, and a store's first decoding) and "
                                "read ahead; 0: the CPU cores per torchrun process, at most 8")
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
    schedule: Schedule = _f(Schedule.step, "fine-tuning learning-rate schedule over its epochs, as teacher.schedule "
                                           "(with teacher.lr_milestones and warmup); the authors' script: cosine")


# help texts of the training keys that teacher and distill share
OPTIMIZER_HELP = ("optimizer: sgd (with momentum), adam, or adamw (decoupled weight decay, none on biases and "
                  "normalisation weights: the 1-D parameters)")
SCHEDULE_HELP = ("learning-rate schedule: step (x0.1 at lr_milestones), cosine (annealed to 0 over the epochs) or "
                 "linear (down to 0 at the last optimizer step); per epoch, but per optimizer step for linear or "
                 "after a warm-up")
WARMUP_HELP = ("linear warm-up of the learning rate from 0 before the schedule: optimizer steps, or a fraction of "
               "all optimizer steps if < 1 (0.1: the first tenth); 0: none")
LOG_EXAMPLES_HELP = ("held-out examples each log entry measures (a fixed draw, the same at every entry); 0: "
                     "automatic, all of them where the entries cost at most half of training, else as many as "
                     "that allows, at least 2048")


@dataclass(frozen=True)
class TeacherConfig:
    bayes: Bayes = _f(Bayes.none, "teacher kind")
    arch: str = _arch("architecture: a built-in name (mlp, resnet20, wrn_16_2, ...), torchvision:NAME, "
                      "timm:NAME, or your factory MODULE:CALLABLE or path/to/FILE.py:CALLABLE")
    arch_kwargs: dict = _f({}, "keyword arguments for the architecture's builder (besides num_classes)")
    normalize: Normalize | dict = _f(Normalize.data, "images, after scaling to [0, 1]: data (the training data's "
                                     "channel mean/std), imagenet (torchvision's pretrained weights), none (the "
                                     "network normalises itself) or {mean: [3], std: [3]}; vectors: data.standardize "
                                     "(none: raw)")
    init: str = _f("", "start from this trained network's weights (.safetensors, .pt or .pth state dict)")
    hidden: tuple[int, ...] = _f((256, 256), "hidden layer widths")
    epochs: int = _f(60, "training epochs")
    batch_size: int = _f(128, "training batch size")
    accumulate: int = _f(1, "batches whose mean gradient makes one optimizer step (gradient accumulation): an "
                            "effective batch of batch_size x accumulate")
    optimizer: Optimizer = _f(Optimizer.adam, OPTIMIZER_HELP)
    lr: float = _f(1e-3, "learning rate (the peak of a warm-up)")
    schedule: Schedule = _f(Schedule.step, SCHEDULE_HELP)
    lr_milestones: tuple[int, ...] = _f((), "epochs after which the learning rate is multiplied by 0.1 (schedule step)")
    warmup: float = _f(0.0, WARMUP_HELP)
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    seed: int = _f(0, "seed of initialisation and batch order")
    log_every: int = _f(0, "optimizer steps between held-out NLL/accuracy log entries (metrics.jsonl); 0: automatic, "
                           "at least 20 per run and one per epoch")
    log_examples: int = _f(0, LOG_EXAMPLES_HELP)
    base: str = _f("", "existing deterministic teacher.pt to fit the posterior around instead of training")
    augment: bool = _f(True, "image data: train on a random view (data.crop) of each image every epoch")
    laplace: LaplaceConfig = _f(LaplaceConfig(), "Laplace approximation (bayes=laplace)")
    vi: VIConfig = _f(VIConfig(), "mean-field variational inference (bayes=vi)")
    mc_dropout: MCDropoutConfig = _f(MCDropoutConfig(), "Monte Carlo dropout (bayes=mc-dropout)")
    ensemble: EnsembleConfig = _f(EnsembleConfig(), "deep ensemble (bayes=ensemble)")
    mcmi: MCMIConfig = _f(MCMIConfig(), "cross-entropy training fine-tuned with a CMI term (bayes=mcmi)")


@dataclass(frozen=True)
class CalibrateConfig:
    prior: PriorTuning = _f(PriorTuning.gridsearch, "Laplace prior precision on held-out data: keep, marglik or gridsearch")
    prior_grid: tuple[float, ...] = _f((), "prior gridsearch: [log10 of the smallest, log10 of the largest, points]; "
                                           "empty: the teacher's teacher.laplace grid_min, grid_max, grid_size. The "
                                           "teacher's own prior precision is kept where no point lowers held-out NLL")
    temperature: TemperatureFit = _f(TemperatureFit.none, "fit a temperature on held-out NLL (any teacher)")
    temper: Temper = _f(Temper.logits, "how T_t tempers the targets: logits (each logit draw, or the logit "
                                       "distribution, divided by T_t; bcpkd's default) or predictive (the "
                                       "predictive p, then p^(1/T_t) renormalised; the authors' code)")
    draws: int = _f(0, "also keep the first K Monte Carlo draws of a sampling teacher per example and view "
                       "([N, V, K, C]; vi, mc-dropout, ensemble, laplace with link mc); 0: only their mean")
    top_k: int = _f(0, "store per example and view only the K largest probabilities and their class ids (the "
                       "rest of the mass spread evenly over the other classes); 0: the dense distribution")
    cache_dtype: CacheDtype = _f(CacheDtype.float32, "dtype of the cached BCPs")
    views: int = _f(1, "augmentation views V cached per training image (1: no augmentation; at most 162)")
    batch_size: int = _f(0, "inference batch size of the cache build; 0: chosen for the device (CPU 128, CUDA "
                            "512), recorded in the cache as inference_batch_size")


@dataclass(frozen=True)
class DistillConfig:
    arch: str = _arch("student architecture: a built-in name, torchvision:NAME, timm:NAME, or your factory "
                      "MODULE:CALLABLE or path/to/FILE.py:CALLABLE")
    arch_kwargs: dict = _f({}, "keyword arguments for the student architecture's builder (besides num_classes)")
    normalize: Normalize | dict = _f(Normalize.data, "the student's images, after scaling to [0, 1]: data, "
                                     "imagenet, none or {mean: [3], std: [3]}, as teacher.normalize")
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
    accumulate: int = _f(1, "batches whose mean gradient makes one optimizer step (gradient accumulation): an "
                            "effective batch of batch_size x accumulate")
    optimizer: Optimizer = _f(Optimizer.sgd, OPTIMIZER_HELP)
    lr: float = _f(0.01, "learning rate (the peak of a warm-up)")
    schedule: Schedule = _f(Schedule.step, SCHEDULE_HELP)
    lr_milestones: tuple[int, ...] = _f((), "epochs after which the learning rate is multiplied by 0.1 (schedule step)")
    warmup: float = _f(0.0, WARMUP_HELP)
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    seed: int = _f(0, "seed of initialisation and noisy targets (and of the data order unless data_seed is set)")
    data_seed: int = _f(-1, "seed of batch order, view draws and few-shot subset (-1: distill.seed); students "
                            "trained in lockstep share it")
    log_every: int = _f(0, "optimizer steps between held-out NLL/accuracy log entries (metrics.jsonl); 0: automatic, "
                           "at least 20 per run and one per epoch")
    log_examples: int = _f(0, LOG_EXAMPLES_HELP)
    grad_noise_examples: str = _f("2048", "training examples the final gradient noise (grad_noise) is measured on: "
                                          "K drawn by distill.seed (shared out under torchrun), all, or 0 (none)")


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int = _f(15, "equal-width confidence bins of the ECE")
    batch_size: int = _f(0, "inference batch size; 0: chosen for the device (CPU 128, CUDA 512)")
    grad_targets: tuple[str, ...] = _f((), "students: also measure gradient noise against onehot, true, noisy:ALPHA")
    grad_noise_examples: str = _f("2048", "grad_targets: training examples measured, K drawn by the student's "
                                          "distill.seed (the rows of its own grad_noise for the same K), all, or 0 "
                                          "(none)")


@dataclass(frozen=True)
class ExperimentConfig:
    teachers: dict = _f({}, "bcpkd run: name -> overrides of the teacher section (`base: NAME` names another teacher)")
    students: dict = _f({}, "bcpkd run: name -> overrides of the distill section (plus `teacher: NAME`)")
    seeds: tuple[int, ...] = _f((0,), "bcpkd run: student seeds")
    teacher_seeds: tuple[int, ...] = _f((0,), "bcpkd run: teacher seeds; with several, every teacher is trained once "
                                              "per seed and its students learn from each (teacher variance shows)")
    workers: int = _f(1, "bcpkd run: students trained in parallel processes, which share the CPUs (each process's "
                         "automatic threads and loader workers: its share)")
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
    threads: int = _f(0, "intra-op CPU threads per process; 0: OMP_NUM_THREADS if set, else the CPUs this process may "
                         "use (affinity, cgroup quota) per torchrun process, less the streaming loader workers")
    precision: Precision = _f(Precision.auto, "training arithmetic: auto (bf16 autocast and channels_last on CUDA, "
                                              "float32 on CPU), float32 everywhere, or bf16 autocast everywhere "
                                              "(channels_last on CUDA; CPUs with bf16 units); inference and caches "
                                              "are always float32")
    compile: bool = _f(False, "torch.compile the training forward pass (worth it for long GPU runs)")
    data: DataConfig = _f(DataConfig(), "data")
    teacher: TeacherConfig = _f(TeacherConfig(), "train-teacher")
    calibrate: CalibrateConfig = _f(CalibrateConfig(), "calibrate and BCP cache")
    distill: DistillConfig = _f(DistillConfig(), "distill")
    evaluate: EvaluateConfig = _f(EvaluateConfig(), "evaluate")
    experiment: ExperimentConfig = _f(ExperimentConfig(), "bcpkd run only")
    log: LogConfig = _f(LogConfig(), "progress lines and TensorBoard")


def config_field(dotted: str) -> dataclasses.Field:
    """The field of a dotted recipe key (`teacher.laplace.hessian`): its default and one-line help."""
    cls: Any = Recipe
    *sections, leaf = dotted.split(".")
    for name in sections:
        cls = typing.get_type_hints(cls)[name]
    return next(f for f in dataclasses.fields(cls) if f.name == leaf)


SYNTHETIC_ONLY = ("n_classes", "dim", "noise_var", "mean_choices")  # data keys that only the synthetic set reads
IMAGE_ONLY = ("image_size", "view_padding", "crop", "decode", "loader_workers")
TEXT_ONLY = ("text_column", "text_pair_column", "max_length")
UNUSED_DATA_KEYS = {
    DatasetName.synthetic: ("root", "download", *IMAGE_ONLY, *TEXT_ONLY, "label_column", "skip_unreadable"),
    DatasetName.arrays: (*SYNTHETIC_ONLY, "download", *IMAGE_ONLY, *TEXT_ONLY, "skip_unreadable"),
    DatasetName.imagefolder: (*SYNTHETIC_ONLY, *TEXT_ONLY, "label_column", "download", "standardize"),
    DatasetName.cifar10: (*SYNTHETIC_ONLY, *TEXT_ONLY, "label_column", "standardize", "decode", "loader_workers",
                          "skip_unreadable"),
    DatasetName.cifar100: (*SYNTHETIC_ONLY, *TEXT_ONLY, "label_column", "standardize", "decode", "loader_workers",
                           "skip_unreadable"),
    DatasetName.text: (*SYNTHETIC_ONLY, *IMAGE_ONLY, "download", "standardize", "skip_unreadable"),
    DatasetName.hf: (*SYNTHETIC_ONLY, *IMAGE_ONLY, "download", "standardize", "skip_unreadable"),
}


def plain_data(cfg: DataConfig) -> dict:
    """The data section as plain values, without the keys its dataset does not read (an image folder's
    config does not claim `n_classes: 5`)."""
    unused = UNUSED_DATA_KEYS[cfg.name] + (("view_padding",) if cfg.crop == Crop.resized else ())
    return {k: v for k, v in to_plain(cfg).items() if k not in unused}


# What an artifact's stored config holds: the sections that made it (and `calibrate` for a calibrated teacher
# and for a student of a teacher).
RUN_KEYS = ("out", "device", "threads", "precision", "compile")
TEACHER_RECORD = (*RUN_KEYS, "data", "teacher", "log")
STUDENT_RECORD = (*RUN_KEYS, "data", "distill", "log")


KIND_SECTIONS = {Bayes.laplace: "laplace", Bayes.vi: "vi", Bayes.mc_dropout: "mc_dropout", Bayes.ensemble: "ensemble",
                 Bayes.mcmi: "mcmi"}  # the teacher section's subsection that each kind reads (the others: none)


def drop_other_kinds(teacher: dict) -> dict:
    """A plain teacher section without the subsections of the kinds it is not (a deterministic teacher's config
    carries no `laplace:` or `vi:` settings); the same dict."""
    own = KIND_SECTIONS.get(Bayes(teacher.get("bayes", Bayes.none.value)))
    for section in KIND_SECTIONS.values():
        if section != own:
            teacher.pop(section, None)
    return teacher


def recipe_record(recipe: Recipe, sections: typing.Iterable[str]) -> dict:
    """The plain config an artifact stores: only the top-level keys and sections that made it (its data
    section without the keys its dataset does not read, a network's without `hidden` unless it is the mlp, the
    one that reads it, on text without the image/vector keys `normalize` and `augment`, the teacher's without
    the subsections of other kinds); a valid recipe for `--recipe`."""
    plain = to_plain(recipe)
    drop_other_kinds(plain["teacher"])
    for network in ("teacher", "distill"):
        if plain[network]["arch"] != "mlp":
            del plain[network]["hidden"]
        if recipe.data.name in (DatasetName.text, DatasetName.hf):  # keys of image and vector inputs
            for key in ("normalize", "augment"):
                plain[network].pop(key, None)
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
