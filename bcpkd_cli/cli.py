"""The `bcpkd` command: thin Typer commands that parse flags into a recipe and call one stage.

stdout carries what scripts consume (artifact paths, or JSON with --json); everything else goes to
stderr. Exit codes: 0 success, 2 bad input, 1 failure, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from bcpkd_cli import artifacts
from bcpkd_cli.choices import Bayes, Hessian, Link, PriorMethod, PriorTuning, Subset, Targets, TemperatureFit
from bcpkd_cli.config import (Recipe, build_recipe, config_field, merge, parse_set, parse_sweep, read_recipe,
                              recipe_for_checkpoint, set_path)
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from bcpkd_cli.teachers import TEACHER_KINDS, recipe_problems

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation from Bayesian teachers through cached Bayes class probabilities.")



def field_help(dotted: str) -> str:
    """The help of a typed flag: the config field's own one-line help and its default (config.py is the source)."""
    f = config_field(dotted)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if hasattr(default, "value"):
        default = default.value
    elif isinstance(default, tuple):
        default = ",".join(str(v) for v in default) or "none"
    return f"{f.metadata['help']} [default: {default}]" if default != "" else f.metadata["help"]


def config_option(dotted: str, *names: str) -> typer.models.OptionInfo:
    """A typed flag for the recipe key `dotted`: unset (None) unless given, its help from config.py."""
    return typer.Option(None, *names, help=field_help(dotted))


def checked(tree: dict, source: str) -> Recipe:
    """The recipe of a command line, with every problem (the teacher kind's own rules too) reported at once."""
    return build_recipe(tree, source, checks=(recipe_problems,))


RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe (default: the embedded synthetic benchmark)")
OutOpt = typer.Option("", "--out", "-o", help=config_field("out").metadata["help"])
DeviceOpt = config_option("device", "--device")
SetOpt = typer.Option(None, "--set", "-s", help="override any recipe key: section.key=value (repeatable)")
ResumeOpt = typer.Option(False, "--resume", help="continue the interrupted run in --out from its last epoch "
                                                 "(same options; the result equals an uninterrupted run)")


def _check_resume(resume: bool, out: str) -> None:
    if resume and not out:
        raise BcpkdError("--resume: give --out FOLDER, the folder of the interrupted run")


def _tree(recipe: Optional[Path], sets: Optional[list[str]], flags: dict) -> dict:
    """Recipe file, then typed flags, then --set items (later wins). Flags given as None are skipped."""
    typed: dict = {}
    for dotted, value in flags.items():
        if value is None or value == "":
            continue
        set_path(typed, dotted, value.value if hasattr(value, "value") else value)
    return merge(merge(read_recipe(recipe), typed), parse_set(sets or []))


def _source(recipe: Optional[Path]) -> str:
    return f"recipe {recipe}" if recipe else "options"


def _one_process(command: str) -> None:
    """Only train-teacher and distill train data-parallel; under torchrun other commands would repeat
    their work and writes."""
    from bcpkd_cli.engine import launched_by_torchrun

    if launched_by_torchrun():
        raise BcpkdError(f"{command} runs in one process: run it without torchrun (only `train-teacher` and "
                         f"`distill` train data-parallel under torchrun)")


@app.command("train-teacher")
def train_teacher(
    recipe: Optional[Path] = RecipeOpt,
    bayes: Optional[Bayes] = config_option("teacher.bayes"),
    epochs: Optional[int] = config_option("teacher.epochs"),
    seed: Optional[int] = config_option("teacher.seed"),
    base: Optional[Path] = config_option("teacher.base"),
    subset: Optional[Subset] = config_option("teacher.laplace.subset"),
    hessian: Optional[Hessian] = config_option("teacher.laplace.hessian"),
    prior: Optional[PriorMethod] = config_option("teacher.laplace.prior"),
    link: Optional[Link] = config_option("teacher.laplace.link"),
    samples: Optional[int] = typer.Option(None, help="Monte Carlo samples S of the predictive (vi, mc-dropout; "
                                                     "laplace with --link mc)"),
    members: Optional[int] = config_option("teacher.ensemble.members"),
    member: Optional[list[Path]] = typer.Option(None, help="ensemble: assemble existing teacher.pt files "
                                                          "instead of training (repeat for each member)"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Train a teacher of any kind and save a self-describing teacher.pt (path printed on stdout).
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli train-teacher ..."""
    from bcpkd_cli.engine import leave_process_group
    from bcpkd_cli.stages import train_teacher as stage

    tree = _tree(recipe, set_, {"out": out, "device": device, "teacher.bayes": bayes, "teacher.epochs": epochs,
                                "teacher.seed": seed, "teacher.base": str(base) if base else None,
                                "teacher.laplace.subset": subset, "teacher.laplace.hessian": hessian,
                                "teacher.laplace.prior": prior, "teacher.laplace.link": link,
                                "teacher.ensemble.members": members,
                                "teacher.ensemble.checkpoints": [str(m) for m in member] if member else None})
    if samples is not None:  # the samples of the chosen kind
        kind = build_recipe(tree, _source(recipe)).teacher.bayes
        key = TEACHER_KINDS[kind].samples_key
        if key is None:
            raise BcpkdError(f"--samples: a {kind.value} teacher draws no samples; use it with --bayes vi, "
                             f"mc-dropout or laplace (--link mc)")
        set_path(tree, f"teacher.{key}", samples)
    _check_resume(resume, out)
    try:  # under torchrun: data-parallel training; rank 0 writes and prints
        path = stage.run(checked(tree, _source(recipe)), resume)
    finally:
        leave_process_group()
    if path is not None:
        print(path)


def _with_teacher_data(tree: dict, teacher: Path, source: str):
    payload = artifacts.load_checkpoint(teacher, artifacts.TEACHER_FORMAT)
    return recipe_for_checkpoint(tree, payload, source, checks=(recipe_problems,))


@app.command()
def calibrate(
    teacher: Path = typer.Option(..., help="teacher.pt from train-teacher"),
    recipe: Optional[Path] = RecipeOpt,
    prior: Optional[PriorTuning] = config_option("calibrate.prior"),
    temperature: Optional[TemperatureFit] = config_option("calibrate.temperature"),
    t_teacher: Optional[float] = config_option("distill.t_teacher"),
    out: str = typer.Option("", "--out", "-o", help="cache folder (default: <teacher folder>/bcp/<key>)"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
) -> None:
    """Calibrate a teacher on held-out data and cache its BCPs for the training split (path on stdout)."""
    from bcpkd_cli.stages import calibrate as stage
    _one_process("calibrate")

    tree = _tree(recipe, set_, {"out": out, "device": device, "calibrate.prior": prior,
                                "calibrate.temperature": temperature, "distill.t_teacher": t_teacher})
    print(stage.run(_with_teacher_data(tree, teacher, _source(recipe)), teacher))


@app.command()
def distill(
    teacher: Optional[Path] = typer.Option(None, help="teacher.pt (its cached BCPs are found or built)"),
    cache: Optional[Path] = typer.Option(None, help="bcp.safetensors from `calibrate --out` (default: found by key)"),
    recipe: Optional[Path] = RecipeOpt,
    targets: Optional[Targets] = config_option("distill.targets"),
    alpha: Optional[float] = config_option("distill.alpha"),
    t_teacher: Optional[float] = config_option("distill.t_teacher"),
    t_student: Optional[float] = config_option("distill.t_student"),
    dirichlet_alpha: Optional[float] = config_option("distill.dirichlet_alpha"),
    epochs: Optional[int] = config_option("distill.epochs"),
    seed: Optional[int] = config_option("distill.seed"),
    temperature: Optional[TemperatureFit] = config_option("calibrate.temperature"),
    sweep: Optional[list[str]] = typer.Option(None, help="train a grid of students in lockstep, one pass over the "
                                                         "data: KEY=V1,V2 over distill keys (repeat for a product "
                                                         "grid); students go to OUT/KEY=V-..., paths one per line"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Train a student against the teacher's cached BCPs; save student.pt (path on stdout).
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli distill ..."""
    from bcpkd_cli.engine import leave_process_group
    from bcpkd_cli.stages import distill as stage

    tree = _tree(recipe, set_, {"out": out, "device": device, "distill.targets": targets, "distill.alpha": alpha,
                                "distill.t_teacher": t_teacher, "distill.t_student": t_student,
                                "distill.dirichlet_alpha": dirichlet_alpha, "distill.epochs": epochs,
                                "distill.seed": seed, "calibrate.temperature": temperature})
    grid = parse_sweep(sweep or [])
    configs = [_with_teacher_data(merge(tree, {"distill": point}), teacher, _source(recipe)) if teacher
               else checked(merge(tree, {"distill": point}), _source(recipe)) for point in grid]
    _check_resume(resume, out)
    try:  # under torchrun: one process per GPU (or CPU share); rank 0 writes and prints
        paths = stage.run_sweep(configs, grid, teacher, cache, out, resume) if sweep else \
            [p for p in [stage.run(configs[0], teacher, cache, resume)] if p is not None]
    finally:
        leave_process_group()
    if paths:
        print("\n".join(str(p) for p in paths))


@app.command()
def evaluate(
    checkpoints: list[Path] = typer.Argument(..., help="teacher.pt or student.pt files"),
    recipe: Optional[Path] = RecipeOpt,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
    grad_targets: Optional[str] = config_option("evaluate.grad_targets"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
) -> None:
    """Evaluate checkpoints on the test split; write report.json (path on stdout, or JSON with --json)."""
    from bcpkd_cli.stages import evaluate as stage
    _one_process("evaluate")

    tree = _tree(recipe, set_, {"device": device, "evaluate.grad_targets": grad_targets})
    checked(tree, _source(recipe))  # report every problem before any work
    path, reports = stage.run(tree, checkpoints, out)
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) if as_json else path)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe with an `experiment` section"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="reuse the teachers and students an interrupted run of "
                                                        "this recipe finished in --out; continue the others"),
) -> None:
    """Run every stage of a recipe and print the comparison table (summary.json path on stdout)."""
    from bcpkd_cli import pipeline
    _one_process("run")

    tree = _tree(recipe, set_, {"out": out, "device": device})
    checked(tree, _source(recipe))
    _check_resume(resume, out)
    print(pipeline.run(tree, str(recipe), resume))


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        code = app(standalone_mode=False)  # typer returns 130 after a Ctrl-C inside a command
        if code == 130:
            raise KeyboardInterrupt
    except BcpkdError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # usage errors: unknown option, bad choice, missing argument
        err.show()
        sys.exit(err.exit_code)
    except BcpkdFailure as err:
        print(f"failed: {err}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted: finished artifacts are kept, unfinished ones were not written (train-teacher and "
              "distill continue from their last epoch end with --resume)", file=sys.stderr)
        sys.exit(130)
