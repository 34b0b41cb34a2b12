"""What the commands share: typed flags whose help comes from config.py, and the steps from flags to a recipe."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Optional

import typer
import yaml

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import refuse_calibrated
from bcpkd_cli.config import Recipe, build_recipe, config_field, merge, parse_set, plain_data, read_recipe, \
    recipe_for_checkpoint, recipe_record, set_path
from bcpkd_cli.console import line
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models.foreign import trust
from bcpkd_cli.teachers import recipe_problems

TEACHERS_DATA = "the data the teacher was made from"  # where calibrate and distill take their data from


def field_help(dotted: str) -> str:
    """The help of a typed flag: the config field's own one-line help and its default (config.py is the source)."""
    f = config_field(dotted)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    default = f.metadata.get("default", default)  # a default that follows other settings, in words
    if hasattr(default, "value"):
        default = default.value
    elif isinstance(default, tuple):
        default = ",".join(str(v) for v in default) or "none"
    return f"{f.metadata['help']} [default: {default}]" if default != "" else f.metadata["help"]


def config_option(dotted: str, *names: str) -> typer.models.OptionInfo:
    """A typed flag for the recipe key `dotted`: unset (None) unless given, its help from config.py."""
    return typer.Option(None, *names, help=field_help(dotted))


def recipe_option(help: str) -> typer.models.OptionInfo:
    """--recipe, with what a recipe gives this command and what it uses without one."""
    return typer.Option(None, "--recipe", "-r", metavar="RECIPE.yaml", help=help)


def data_option(default: str = "") -> typer.models.OptionInfo:
    """--data; `default`: where the command's data come from without it, in words (empty: data.name's default)."""
    if not default:
        return config_option("data.name", "--data")
    return typer.Option(None, "--data", help=f"{config_field('data.name').metadata['help']} (default: {default})")


def data_root_option(default: str = "") -> typer.models.OptionInfo:
    """--data-root; `default` as for data_option."""
    return typer.Option(None, "--data-root", metavar="DIR",
                        help=f"{field_help('data.root')} (default: {default})" if default else field_help("data.root"))


def set_option(example: str) -> typer.models.OptionInfo:
    """--set, with an example of a key the command reads."""
    return typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                        help=f"override any recipe key, e.g. --set {example} (repeatable)")


OutOpt = typer.Option("", "--out", "-o", metavar="DIR", help=config_field("out").metadata["help"])
DeviceOpt = typer.Option(None, "--device", metavar="auto|cpu|cuda[:N]", help=field_help("device"))
ResumeOpt = typer.Option(False, "--resume", help="continue the interrupted run in --out from its last epoch "
                                                 "(same options; the result equals an uninterrupted run)")
ForceOpt = typer.Option(False, "--force", help="replace what --out already holds (a finished or interrupted run)")
TrustOpt = typer.Option(False, "--trust-code", help="build networks that checkpoints name by your own module or "
                                                      "file (module:callable): that code runs")
NORMALIZE = "data|imagenet|none|{mean: [..], std: [..]}"
PrintConfigOpt = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit "
                                                            "(nothing is run)")


def recipe_tree(recipe: Optional[Path], sets: Optional[list[str]], flags: dict, recipe_data: bool = True) -> dict:
    """Recipe file, then typed flags, then --set items (later wins). Flags given as None are skipped. Without
    `recipe_data` the recipe's data section is left out: the command's data are a checkpoint's (`say_data`)."""
    typed: dict = {}
    for dotted, value in flags.items():
        if value is None or value == "":
            continue
        value = value.value if hasattr(value, "value") else value
        set_path(typed, dotted, str(value) if isinstance(value, Path) else value)
    given = {k: v for k, v in read_recipe(recipe).items() if recipe_data or k != "data"}
    return merge(merge(given, typed), parse_set(sets or []))


def say_unused_teacher_sets(sets: Optional[list[str]], checkpoint: dict, path: Path) -> None:
    """One line for each --set teacher.KEY=V that differs from the settings the teacher at `path` was trained with:
    this command uses the checkpoint's (the same --set items passed to every stage of a script are said nothing)."""
    trained = checkpoint["config"].get("teacher", {})
    for item in sets or []:
        key, _, raw = item.partition("=")
        if not key.startswith("teacher."):
            continue
        node = trained
        for part in key.split(".")[1:]:
            node = node.get(part) if isinstance(node, dict) else None
        value = yaml.safe_load(raw) if raw else ""
        if not _same(value, node):
            line(f"note: --set {key}={raw} is not used: {path} was trained with {key} {_value(node)}, and this "
                 f"command uses its settings (calibration's own keys are calibrate.*, e.g. calibrate.prior_grid="
                 f"[-4,4,21] for the prior grid search)")


def say_data(recipe: Optional[Path], tree: dict, checkpoint: dict, path: Path) -> None:
    """One line when the data section of `recipe` asks for other data than `checkpoint` (at `path`) was made from:
    the checkpoint's are used (--data, --data-root and --set data.KEY=V change them: they are in `tree`), and the
    --set items that would use the recipe's."""
    section = read_recipe(recipe).get("data") if recipe else None
    if not isinstance(section, dict) or not section or os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 says it
        return
    used = plain_data(recipe_for_checkpoint(tree, checkpoint).data)
    try:
        asked = plain_data(recipe_for_checkpoint(merge({"data": section}, tree), checkpoint).data)
    except BcpkdError:  # the recipe's data would be refused (of the other kind, ...): its keys as written
        asked = {**used, **{k: v for k, v in section.items() if k not in (tree.get("data") or {})}}
    differ = [k for k in asked if asked[k] != used.get(k)]
    if not differ:
        return

    def shown(keys: list[str], values: dict) -> str:
        return ", ".join(f"{k} {_value(values.get(k))}" for k in keys)

    sets = " ".join(f"--set {shlex.quote(f'data.{k}={_value(asked[k])}')}" for k in differ)
    line(f"data: as {path} was made from ({shown(differ, used)}), not as the data section of recipe {recipe} says "
         f"({shown(differ, asked)}); to use the recipe's, add {sets}")


def _same(a, b) -> bool:
    """Config values equal as settings: numbers by value (-4 is -4.0), lists item by item."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return _value(a) == _value(b)


def _value(value) -> str:
    """A config value as --set takes it: lists as [a,b], booleans as true/false."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def source_of(recipe: Optional[Path]) -> str:
    """Where a command's settings come from, as its error messages name it."""
    return f"recipe {recipe}" if recipe else "options"


def checked(tree: dict, source: str, checkpoint: dict | None = None) -> Recipe:
    """The recipe of a command line (with the data of `checkpoint`, a teacher's payload, by default), every
    problem (the teacher kind's own rules too) reported at once. The architectures it names are the user's
    choice: user code there may be imported (models.foreign.trust)."""
    recipe = recipe_for_checkpoint(tree, checkpoint, source, checks=(recipe_problems,)) if checkpoint else \
        build_recipe(tree, source, checks=(recipe_problems,))
    trust([recipe.teacher.arch, recipe.distill.arch])
    return recipe


def show_config(recipe: Recipe, sections: tuple[str, ...]) -> None:
    """--print-config: the resolved config of the keys a command reads, as YAML a --recipe accepts."""
    print(yaml.safe_dump(recipe_record(recipe, sections), sort_keys=False), end="")


def check_resume(resume: bool, force: bool, out: str) -> None:
    if resume and not out:
        raise BcpkdError("--resume: give --out FOLDER, the folder of the interrupted run")
    if resume and force:
        raise BcpkdError("--resume and --force: choose one (continue the run in --out, or replace it)")


def teacher_checkpoint(teacher: Path) -> tuple[Path, dict]:
    """--teacher: the teacher.pt a user means (a run folder stands for the one in it), not a calibrated one."""
    path = artifacts.resolve_checkpoint(teacher, artifacts.TEACHER_FORMAT, "--teacher")
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    refuse_calibrated(path, payload)
    return path, payload


def one_process(command: str) -> None:
    """Only train-teacher, distill and calibrate share their work across processes; under torchrun other
    commands would repeat their work and writes."""
    from bcpkd_cli.engine import launched_by_torchrun

    if launched_by_torchrun():
        raise BcpkdError(f"{command} runs in one process: run it without torchrun (only `train-teacher`, "
                         f"`distill` and `calibrate` share their work across processes under torchrun)")
