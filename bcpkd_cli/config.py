"""Typed, frozen configuration of every stage: YAML recipe + `--set` overrides -> one Recipe.

The sections and their fields (each with a one-line help text) are in schema.py; this module parses
and validates. All problems (unknown keys, bad values) are collected and reported together before
any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from bcpkd_cli.choices import Arch, DatasetName, Normalize
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.roots import TEXT_DATA, VECTOR_DATA, named_by_root, root_kind  # noqa: F401 (root_kind re-exported)
from bcpkd_cli.schema import (  # noqa: F401 (re-exported: configuration is imported from here)
    DEFAULT_ARCH, RUN_KEYS, STUDENT_RECORD, TEACHER_RECORD, CalibrateConfig, DataConfig, DistillConfig, EnsembleConfig,
    EvaluateConfig, ExperimentConfig, LaplaceConfig, LogConfig, MCDropoutConfig, MCMIConfig, Recipe, TeacherConfig,
    VIConfig, config_field, drop_other_kinds, plain_data, recipe_record, to_plain)
from bcpkd_cli.choices import (  # noqa: F401 (re-exported, as before the enums moved to choices.py)
    Bayes, CacheDtype, Hessian, Link, Optimizer, Precision, PriorMethod, PriorTuning, Subset, Targets, TemperatureFit)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_FOREIGN = re.compile(r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*$")  # torchvision:NAME, timm:NAME, MODULE:CALLABLE, FILE.py:...
BUILT_IN = tuple(a.value for a in Arch)
_GRAD_TARGET = re.compile(r"^(onehot|true|noisy:\d+(\.\d+)?)$")
_POSITIVE = {"n_classes", "dim", "batch_size", "accumulate", "prior_sigma", "lr_scale",
             "samples", "grid_size", "log_every", "log_examples", "ece_bins", "noise_var", "lr", "dirichlet_alpha",
             "t_teacher", "t_student", "workers", "hidden", "line_seconds"}
_AUTOMATIC_AT_ZERO = {"calibrate.batch_size", "evaluate.batch_size", "teacher.log_every", "distill.log_every",
                      "teacher.log_examples", "distill.log_examples"}  # positive, or 0: chosen by bcpkd
_EXAMPLES = re.compile(r"^(all|0|[1-9]\d*)$")  # distill/evaluate.grad_noise_examples


def _convert(value: Any, typ: Any, where: str, errors: list[str]) -> Any:
    """Convert one YAML/CLI value to the field's type, appending a message on failure."""
    if value is None and typ is str:
        return ""  # YAML `null` for a path or name means "not set"
    if typ == Normalize | dict:
        return _normalize(value, where, errors)
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


_MAPPING = "{mean: [m1, m2, m3], std: [s1, s2, s3]} in [0, 1] units"


def _normalize(value: Any, where: str, errors: list[str]) -> Normalize | dict | None:
    """teacher/distill.normalize: data, imagenet or none (true and false, which recipes and checkpoints said
    before the choices had names, mean data and none), or a {mean, std} mapping: one value per RGB channel."""
    if isinstance(value, str) and value.lstrip().startswith("{"):  # a mapping written as text (a flag's value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            errors.append(f"{where}: {value!r} is not a mapping; write {_MAPPING}")
            return None
    if isinstance(value, bool) or value in ("true", "false"):
        return Normalize.data if value in (True, "true") else Normalize.none
    if isinstance(value, dict):
        return _normalize_mapping(value, where, errors)
    try:
        return Normalize(value)
    except (TypeError, ValueError):
        errors.append(f"{where}: {value!r} is not one of: data, imagenet, none, or a mapping {_MAPPING}")
        return None


def _normalize_mapping(value: dict, where: str, errors: list[str]) -> dict | None:
    if set(value) != {"mean", "std"}:
        errors.append(f"{where}: a mapping takes the keys mean and std, got {', '.join(map(str, value)) or 'none'}; "
                      f"write {_MAPPING}")
        return None
    before, stats = len(errors), {}
    for key in ("mean", "std"):
        numbers = value[key] if isinstance(value[key], (list, tuple)) else [value[key]]
        if len(numbers) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                        for v in numbers):
            errors.append(f"{where}.{key}: expected 3 numbers, one per RGB channel, got {value[key]!r}; write "
                          f"{_MAPPING}")
        elif key == "std" and min(numbers) <= 0:
            errors.append(f"{where}.std: every value must be > 0, got {list(numbers)}")
        elif min(numbers) < 0 or max(numbers) > 1:
            errors.append(f"{where}.{key}: values are in [0, 1] units (divide 0-255 values by 255), got "
                          f"{list(numbers)}")
        else:
            stats[key] = [float(v) for v in numbers]
    return stats if len(errors) == before else None


def _normalize_problems(recipe: Recipe) -> list[str]:
    """Channel statistics for vector data: those are standardised per feature (data.standardize), not by channel."""
    if recipe.data.name not in (DatasetName.synthetic, DatasetName.arrays):
        return []
    return [f"{where}: {getattr(value, 'value', 'a mean/std mapping')} normalises image channels; "
            f"{recipe.data.name.value} data are vectors (data.standardize standardises them); use data or none"
            for where, value in (("teacher.normalize", recipe.teacher.normalize),
                                 ("distill.normalize", recipe.distill.normalize))
            if value not in (Normalize.data, Normalize.none)]


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
        automatic = where in _AUTOMATIC_AT_ZERO
        if f.name in _POSITIVE and any(isinstance(v, (int, float)) and (v < 0 if automatic else v <= 0)
                                       for v in values_to_check):
            errors.append(f"{where}: must be {'0 (automatic) or ' if automatic else ''}positive, got {value!r}")
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


def require_arch(where: str, arch: str) -> None:
    """Text data have no default architecture: the stage that builds a network needs one named."""
    if not arch:
        raise BcpkdError(f"{where}: text data take a Hugging Face classifier; name one with --arch hf:NAME_OR_DIR "
                         f"(e.g. hf:bert-base-uncased or a local folder with config.json and a tokenizer)")


def default_arch(data: DatasetName) -> str:
    """The architecture of a recipe that names none: a small CNN for images, the mlp for feature vectors; text has
    none (a Hugging Face model is named: hf:NAME_OR_DIR)."""
    return DEFAULT_ARCH["vectors" if data in VECTOR_DATA else "text" if data in TEXT_DATA else "images"]


def _arch_problems(recipe: Recipe) -> list[str]:
    """Architectures that cannot take the data: an image network on feature vectors, the mlp on images."""
    errors: list[str] = []
    data = recipe.data.name.value
    if recipe.data.name == DatasetName.synthetic and recipe.data.root:
        return errors  # the data are not known yet: data.root names none (said already)
    for where, arch in (("teacher.arch", recipe.teacher.arch), ("distill.arch", recipe.distill.arch)):
        if recipe.data.name in TEXT_DATA or arch.startswith("hf:"):
            if recipe.data.name not in TEXT_DATA:
                errors.append(f"{where}: {arch} is a text classifier, but {data} data are "
                              f"{'feature vectors' if recipe.data.name in VECTOR_DATA else 'images'}; give text "
                              f"data (--data text --data-root FILE)")
            elif arch and not arch.startswith("hf:") or arch == "hf:":  # unset: said by the stage that needs it
                errors.append(f"{where}: {arch or 'no architecture'}: {data} data take a Hugging Face classifier; "
                              f"name one with --arch hf:NAME_OR_DIR (e.g. hf:bert-base-uncased or a local folder)")
        elif not (arch in BUILT_IN or _FOREIGN.match(arch)):
            errors.append(f"{where}: {arch!r} is not a built-in architecture ({', '.join(BUILT_IN)}) nor "
                          f"torchvision:NAME, timm:NAME, MODULE:CALLABLE or FILE.py:CALLABLE")
        elif recipe.data.name in VECTOR_DATA and (arch in BUILT_IN and arch != "mlp"
                                                  or arch.startswith(("torchvision:", "timm:"))):
            errors.append(f"{where}: {arch} needs image data, but {data} data are feature vectors; choose --arch mlp "
                          f"(or your own MODULE:CALLABLE factory), or image data with --data-root")
        elif recipe.data.name not in VECTOR_DATA and arch == "mlp":
            errors.append(f"{where}: mlp takes feature vectors, but {data} data are images; choose --arch "
                          f"{default_arch(recipe.data.name)} (or another image network)")
    return errors


Check = typing.Callable[[Recipe], "list[str]"]  # more rules on a typed recipe, e.g. a teacher kind's own


def build_recipe(tree: dict, source: str = "recipe", checks: typing.Sequence[Check] = ()) -> Recipe:
    """Validate a raw dict into a Recipe, reporting every problem (and those of `checks`) at once."""
    errors: list[str] = []
    recipe = named_by_root(tree, _build(Recipe, _renamed(tree), "", errors), errors)
    arch = default_arch(recipe.data.name)  # an architecture left unset follows the data
    recipe = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, arch=recipe.teacher.arch or arch),
                                 distill=dataclasses.replace(recipe.distill, arch=recipe.distill.arch or arch))
    if not _DEVICE.match(recipe.device):
        errors.append(f"device: {recipe.device!r} is not one of: auto, cpu, cuda, cuda:N")
    if recipe.threads < 0:
        errors.append(f"threads: must be 0 (chosen from the CPUs allowed) or positive, got {recipe.threads}")
    if not 0.0 <= recipe.distill.alpha <= 1.0:
        errors.append(f"distill.alpha: must be in [0, 1], got {recipe.distill.alpha}")
    for where, items in (("data.mean_choices", recipe.data.mean_choices), ("experiment.seeds", recipe.experiment.seeds),
                         ("experiment.teacher_seeds", recipe.experiment.teacher_seeds)):
        if not items:
            errors.append(f"{where}: must not be empty")
    if not 1 <= recipe.calibrate.views <= 162:
        errors.append(f"calibrate.views: must lie in 1..162 (the views of each image), got {recipe.calibrate.views}")
    if recipe.data.name == DatasetName.synthetic and recipe.calibrate.views != 1:
        errors.append("calibrate.views: the synthetic dataset has no augmentation views; use 1")
    if recipe.data.name in TEXT_DATA and recipe.calibrate.views != 1:
        errors.append("calibrate.views: text has no augmentation views (a view is a crop or flip of an image); use 1")
    if recipe.distill.few_shot < 0:
        errors.append(f"distill.few_shot: must be 0 (all) or positive, got {recipe.distill.few_shot}")
    if recipe.data.n_heldout < -1:
        errors.append(f"data.n_heldout: must be -1 (the default), 0 (none) or positive, got {recipe.data.n_heldout}")
    for key in ("n_train", "n_test", "loader_workers"):
        if getattr(recipe.data, key) < 0:
            errors.append(f"data.{key}: must be 0 (the default) or positive, got {getattr(recipe.data, key)}")
    if recipe.data.name != DatasetName.synthetic and not recipe.data.root:
        errors.append(f"data.root: dataset {recipe.data.name.value} needs a folder or file, e.g. --data-root /data/cifar")
    errors += _arch_problems(recipe)
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
    if recipe.calibrate.top_k < 0:
        errors.append(f"calibrate.top_k: must be 0 (dense) or positive, got {recipe.calibrate.top_k}")
    elif recipe.calibrate.top_k and recipe.calibrate.draws:
        errors.append("calibrate.top_k: a top-k cache keeps no Monte Carlo draws; set calibrate.draws=0 or top_k=0")
    grid = recipe.calibrate.prior_grid
    if grid and not (len(grid) == 3 and grid[0] <= grid[1] and float(grid[2]).is_integer() and grid[2] >= 1):
        errors.append(f"calibrate.prior_grid: give [log10 of the smallest, log10 of the largest, points], e.g. "
                      f"[-4, 4, 21], got {list(grid)}")
    if recipe.calibrate.draws < 0:
        errors.append(f"calibrate.draws: must be 0 or positive, got {recipe.calibrate.draws}")
    if recipe.data.image_size < 0:
        errors.append(f"data.image_size: must be 0 (keep the size) or positive, got {recipe.data.image_size}")
    for where, examples in (("distill.grad_noise_examples", recipe.distill.grad_noise_examples),
                            ("evaluate.grad_noise_examples", recipe.evaluate.grad_noise_examples)):
        if not _EXAMPLES.match(examples):
            errors.append(f"{where}: {examples!r} is not a number of examples K, all, or 0 (none)")
    for item in recipe.evaluate.grad_targets:
        if not _GRAD_TARGET.match(item):
            errors.append(f"evaluate.grad_targets: {item!r} is not one of: onehot, true, noisy:ALPHA")
    errors += _teacher_problems(recipe.teacher)
    for where, warmup in (("teacher.warmup", recipe.teacher.warmup), ("distill.warmup", recipe.distill.warmup)):
        if warmup < 0 or (warmup >= 1 and not float(warmup).is_integer()):
            errors.append(f"{where}: must be 0 (none), a number of optimizer steps or a fraction < 1 of all of them, "
                          f"got {warmup}")
    errors += _normalize_problems(recipe)
    errors += [problem for check in checks for problem in check(recipe)]  # bad values were left at their defaults
    if errors:
        raise BcpkdError(f"{source}: {len(errors)} problem(s): " + "; ".join(errors))
    return recipe


def _renamed(tree: dict) -> dict:
    """The tree with the keys of earlier versions (which checkpoints' configs hold) in today's spelling:
    teacher.mcmi.cosine true/false is teacher.mcmi.schedule cosine/step."""
    teacher = tree.get("teacher")
    if not isinstance(teacher, dict) or not isinstance(teacher.get("mcmi"), dict) or "cosine" not in teacher["mcmi"]:
        return tree
    mcmi = dict(teacher["mcmi"])
    cosine = mcmi.pop("cosine") in (True, "true")
    mcmi.setdefault("schedule", "cosine" if cosine else "step")
    return {**tree, "teacher": {**teacher, "mcmi": mcmi}}


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
    """A recipe whose data section defaults to the data the checkpoint was made from (a data.root of the tree
    without a data.name names its own dataset); data of the other kind, images for a network of feature vectors
    or vectors for one of images, are refused."""
    own = dict(checkpoint["data"]["config"])
    made_from = DatasetName(own.get("name", DatasetName.synthetic.value))
    given = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    if given.get("root") and "name" not in given:
        own.pop("name", None)  # named by what the root is

    def kind(name: DatasetName) -> str:
        return "feature vectors" if name in VECTOR_DATA else "text" if name in TEXT_DATA else "images"

    def same_kind(recipe: Recipe) -> list[str]:
        data = recipe.data
        if kind(data.name) == kind(made_from) or (data.name == DatasetName.synthetic and data.root):
            return []  # (a root that names no dataset: said already)
        return [f"data: {data.name.value} data{f' ({data.root})' if data.root else ''} are {kind(data.name)}, but "
                f"the checkpoint's network takes {kind(made_from)} (it was made from {made_from.value} data); leave "
                f"out --data and --data-root to use its own data, or give {kind(made_from)}"]

    return build_recipe(merge({"data": own}, tree), source, (*checks, same_kind))
