"""The `bcpkd` command: thin Typer commands that parse flags into a recipe and call one stage.

stdout carries what scripts consume (artifact paths, or JSON with --json); everything else goes to
stderr. Exit codes: 0 success, 2 bad input, 1 failure, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import typer
import yaml

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import refuse_calibrated
from bcpkd_cli.choices import (Bayes, DatasetName, Hessian, Link, PriorMethod, PriorTuning, Subset, Targets,
                               TemperatureFit)
from bcpkd_cli.config import (RUN_KEYS, STUDENT_RECORD, TEACHER_RECORD, Recipe, build_recipe, config_field, merge,
                              parse_set, parse_sweep, read_recipe, recipe_for_checkpoint, recipe_record, set_path,
                              to_plain)
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from bcpkd_cli.models.foreign import reset_trust, trust
from bcpkd_cli.teachers import TEACHER_KINDS, recipe_problems

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Knowledge distillation from Bayesian teachers through cached Bayes class probabilities. "
                       "Stages chain through files: train-teacher -> calibrate (optional) -> distill -> evaluate; "
                       "`run RECIPE` runs them all. Every stage prints its artifact's path on stdout.")


def _version(show: bool) -> None:
    if show:
        print(f"bcpkd {version('bcpkd')}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the version and exit")) -> None:
    """Knowledge distillation from Bayesian teachers."""


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


def checked(tree: dict, source: str, checkpoint: dict | None = None) -> Recipe:
    """The recipe of a command line (with the data of `checkpoint`, a teacher's payload, by default), every
    problem (the teacher kind's own rules too) reported at once. The architectures it names are the user's
    choice: user code there may be imported (models.foreign.trust)."""
    recipe = recipe_for_checkpoint(tree, checkpoint, source, checks=(recipe_problems,)) if checkpoint else \
        build_recipe(tree, source, checks=(recipe_problems,))
    trust([recipe.teacher.arch, recipe.distill.arch])
    return recipe


RecipeOpt = typer.Option(None, "--recipe", "-r", metavar="RECIPE.yaml",
                         help="YAML recipe (default: the embedded synthetic benchmark)")
OutOpt = typer.Option("", "--out", "-o", metavar="DIR", help=config_field("out").metadata["help"])
DeviceOpt = typer.Option(None, "--device", metavar="auto|cpu|cuda[:N]", help=field_help("device"))
DataOpt = config_option("data.name", "--data")
DataRootOpt = typer.Option(None, "--data-root", metavar="DIR", help=field_help("data.root"))
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="override any recipe key, e.g. --set teacher.hidden=[512,512] (repeatable)")
ResumeOpt = typer.Option(False, "--resume", help="continue the interrupted run in --out from its last epoch "
                                                 "(same options; the result equals an uninterrupted run)")
ForceOpt = typer.Option(False, "--force", help="replace what --out already holds (a finished or interrupted run)")
TrustOpt = typer.Option(False, "--trust-code", help="build networks that checkpoints name by your own module or "
                                                      "file (module:callable): that code runs")
NORMALIZE = "data|imagenet|none|{mean: [..], std: [..]}"
PrintConfigOpt = typer.Option(False, "--print-config", help="print the resolved config as YAML and exit "
                                                            "(nothing is run)")


def _check_resume(resume: bool, force: bool, out: str) -> None:
    if resume and not out:
        raise BcpkdError("--resume: give --out FOLDER, the folder of the interrupted run")
    if resume and force:
        raise BcpkdError("--resume and --force: choose one (continue the run in --out, or replace it)")


def _print_config(recipe: Recipe, sections: tuple[str, ...]) -> None:
    """--print-config: the resolved config of the keys a command reads, as YAML a --recipe accepts."""
    print(yaml.safe_dump(recipe_record(recipe, sections), sort_keys=False), end="")


def _tree(recipe: Optional[Path], sets: Optional[list[str]], flags: dict) -> dict:
    """Recipe file, then typed flags, then --set items (later wins). Flags given as None are skipped."""
    typed: dict = {}
    for dotted, value in flags.items():
        if value is None or value == "":
            continue
        value = value.value if hasattr(value, "value") else value
        set_path(typed, dotted, str(value) if isinstance(value, Path) else value)
    return merge(merge(read_recipe(recipe), typed), parse_set(sets or []))


def _teacher_checkpoint(teacher: Path) -> tuple[Path, dict]:
    """--teacher: the teacher.pt a user means (a run folder stands for the one in it), not a calibrated one."""
    path = artifacts.resolve_checkpoint(teacher, artifacts.TEACHER_FORMAT, "--teacher")
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    refuse_calibrated(path, payload)
    return path, payload


def _source(recipe: Optional[Path]) -> str:
    return f"recipe {recipe}" if recipe else "options"


def _one_process(command: str) -> None:
    """Only train-teacher, distill and calibrate share their work across processes; under torchrun other
    commands would repeat their work and writes."""
    from bcpkd_cli.engine import launched_by_torchrun

    if launched_by_torchrun():
        raise BcpkdError(f"{command} runs in one process: run it without torchrun (only `train-teacher`, "
                         f"`distill` and `calibrate` share their work across processes under torchrun)")


@app.command("train-teacher")
def train_teacher(
    recipe: Optional[Path] = RecipeOpt,
    bayes: Optional[Bayes] = config_option("teacher.bayes"),
    arch: Optional[str] = typer.Option(None, metavar="ARCH", help=field_help("teacher.arch")),
    init: Optional[Path] = typer.Option(None, metavar="WEIGHTS", help=field_help("teacher.init")),
    normalize: Optional[str] = typer.Option(None, metavar=NORMALIZE, help=field_help("teacher.normalize")),
    epochs: Optional[int] = config_option("teacher.epochs"),
    lr: Optional[float] = config_option("teacher.lr"),
    batch_size: Optional[int] = config_option("teacher.batch_size"),
    seed: Optional[int] = config_option("teacher.seed"),
    data: Optional[DatasetName] = DataOpt, data_root: Optional[Path] = DataRootOpt,
    base: Optional[Path] = typer.Option(None, metavar="TEACHER.pt", help=field_help("teacher.base")),
    subset: Optional[Subset] = config_option("teacher.laplace.subset"),
    hessian: Optional[Hessian] = config_option("teacher.laplace.hessian"),
    prior: Optional[PriorMethod] = config_option("teacher.laplace.prior"),
    link: Optional[Link] = config_option("teacher.laplace.link"),
    samples: Optional[int] = typer.Option(None, help="Monte Carlo samples S of the predictive (vi, mc-dropout; "
                                                     "laplace with --link mc) [default: 20; laplace 100]"),
    members: Optional[int] = config_option("teacher.ensemble.members"),
    member: Optional[list[Path]] = typer.Option(None, metavar="TEACHER.pt",
                                                help="ensemble: assemble existing teacher.pt files instead of "
                                                     "training (repeat for each member)"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt, force: bool = ForceOpt, print_config: bool = PrintConfigOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Train a teacher of any kind and save a self-describing teacher.pt (path printed on stdout).
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli train-teacher ..."""
    from bcpkd_cli.engine import leave_process_group
    from bcpkd_cli.stages import train_teacher as stage

    trust(everything=trust_code)
    tree = _tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                "teacher.bayes": bayes, "teacher.arch": arch, "teacher.init": init,
                                "teacher.normalize": normalize, "teacher.epochs": epochs,
                                "teacher.lr": lr, "teacher.batch_size": batch_size, "teacher.seed": seed,
                                "teacher.base": base, "teacher.laplace.subset": subset,
                                "teacher.laplace.hessian": hessian, "teacher.laplace.prior": prior,
                                "teacher.laplace.link": link, "teacher.ensemble.members": members,
                                "teacher.ensemble.checkpoints": [str(m) for m in member] if member else None})
    if samples is not None:  # the samples of the chosen kind
        kind = build_recipe(tree, _source(recipe)).teacher.bayes
        key = TEACHER_KINDS[kind].samples_key
        if key is None:
            raise BcpkdError(f"--samples: a {kind.value} teacher draws no samples; use it with --bayes vi, "
                             f"mc-dropout or laplace (--link mc)")
        set_path(tree, f"teacher.{key}", samples)
    config = checked(tree, _source(recipe))
    if print_config:
        return _print_config(config, TEACHER_RECORD)
    _check_resume(resume, force, out)
    try:  # under torchrun: data-parallel training; rank 0 writes and prints
        path = stage.run(config, resume, force)
    finally:
        leave_process_group()
    if path is not None:
        print(path)


@app.command()
def calibrate(
    teacher: Path = typer.Option(..., metavar="TEACHER.pt", help="teacher.pt from train-teacher (or its folder)"),
    recipe: Optional[Path] = RecipeOpt,
    prior: Optional[PriorTuning] = config_option("calibrate.prior"),
    temperature: Optional[TemperatureFit] = config_option("calibrate.temperature"),
    t_teacher: Optional[float] = config_option("distill.t_teacher"),
    views: Optional[int] = config_option("calibrate.views"),
    data: Optional[DatasetName] = DataOpt, data_root: Optional[Path] = DataRootOpt,
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="cache folder (default: <teacher folder>/bcp/<key>)"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="build the cache again even where one exists"),
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Calibrate a teacher on held-out data and cache its BCPs for the training split (path on stdout).
    Data default to the teacher's own.
    In shards on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli calibrate ..."""
    from bcpkd_cli.engine import leave_process_group
    from bcpkd_cli.stages import calibrate as stage

    trust(everything=trust_code)

    tree = _tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                "calibrate.prior": prior, "calibrate.temperature": temperature,
                                "calibrate.views": views, "distill.t_teacher": t_teacher})
    teacher, payload = _teacher_checkpoint(teacher)
    config = checked(tree, _source(recipe), payload)
    if print_config:
        return _print_config(config, (*RUN_KEYS, "data", "calibrate", "distill"))
    try:  # under torchrun: each process computes a shard of the cache; rank 0 writes the rest and prints
        path = stage.run(config, teacher, force)
    finally:
        leave_process_group()
    if path is not None:
        print(path)


@app.command()
def distill(
    teacher: Optional[Path] = typer.Option(None, metavar="TEACHER.pt",
                                           help="teacher.pt or its folder (its cached BCPs are found or built)"),
    cache: Optional[Path] = typer.Option(None, metavar="BCP.safetensors",
                                         help="bcp.safetensors from `calibrate --out` (default: found by key)"),
    recipe: Optional[Path] = RecipeOpt,
    targets: Optional[Targets] = config_option("distill.targets"),
    arch: Optional[str] = typer.Option(None, metavar="ARCH", help=field_help("distill.arch")),
    init: Optional[Path] = typer.Option(None, metavar="WEIGHTS", help=field_help("distill.init")),
    normalize: Optional[str] = typer.Option(None, metavar=NORMALIZE, help=field_help("distill.normalize")),
    alpha: Optional[float] = config_option("distill.alpha"),
    t_teacher: Optional[float] = config_option("distill.t_teacher"),
    t_student: Optional[float] = config_option("distill.t_student"),
    dirichlet_alpha: Optional[float] = config_option("distill.dirichlet_alpha"),
    epochs: Optional[int] = config_option("distill.epochs"),
    lr: Optional[float] = config_option("distill.lr"),
    batch_size: Optional[int] = config_option("distill.batch_size"),
    seed: Optional[int] = config_option("distill.seed"),
    temperature: Optional[TemperatureFit] = config_option("calibrate.temperature"),
    views: Optional[int] = config_option("calibrate.views"),
    data: Optional[DatasetName] = DataOpt, data_root: Optional[Path] = DataRootOpt,
    sweep: Optional[list[str]] = typer.Option(None, metavar="KEY=V1,V2",
                                              help="train a grid of students in lockstep, one pass over the data, "
                                                   "over distill keys (repeat for a product grid); students go to "
                                                   "OUT/KEY=V-..., paths one per line"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt, force: bool = ForceOpt, print_config: bool = PrintConfigOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Train a student against the teacher's cached BCPs; save student.pt (path on stdout).
    Data default to the teacher's own.
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli distill ..."""
    from bcpkd_cli.engine import leave_process_group
    from bcpkd_cli.stages import distill as stage

    trust(everything=trust_code)
    tree = _tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                "distill.targets": targets, "distill.arch": arch, "distill.init": init,
                                "distill.normalize": normalize, "distill.alpha": alpha,
                                "distill.t_teacher": t_teacher, "distill.t_student": t_student,
                                "distill.dirichlet_alpha": dirichlet_alpha, "distill.epochs": epochs,
                                "distill.lr": lr, "distill.batch_size": batch_size, "distill.seed": seed,
                                "calibrate.temperature": temperature, "calibrate.views": views})
    grid = parse_sweep(sweep or [])
    payload = None
    if teacher is not None:
        teacher, payload = _teacher_checkpoint(teacher)
    configs = [checked(merge(tree, {"distill": point}), _source(recipe), payload) for point in grid]
    if print_config:
        with_cache = configs[0].distill.targets in (Targets.teacher, Targets.online)
        return _print_config(configs[0], (*STUDENT_RECORD, "calibrate") if with_cache else STUDENT_RECORD)
    _check_resume(resume, force, out)
    try:  # under torchrun: one process per GPU (or CPU share); rank 0 writes and prints
        paths = stage.run_sweep(configs, grid, teacher, cache, out, resume, force) if sweep else \
            [p for p in [stage.run(configs[0], teacher, cache, resume, force)] if p is not None]
    finally:
        leave_process_group()
    if paths:
        print("\n".join(str(p) for p in paths))


@app.command()
def evaluate(
    checkpoints: list[Path] = typer.Argument(..., metavar="CHECKPOINT...",
                                             help="teacher.pt or student.pt files (or their run folders), or "
                                                  "exported model.onnx / model.pt2 files or folders"),
    recipe: Optional[Path] = RecipeOpt,
    as_json: bool = typer.Option(False, "--json", help="print the reports on stdout as JSON: a list with one "
                                                       "object per checkpoint"),
    grad_targets: Optional[str] = typer.Option(None, metavar="onehot,true,noisy:ALPHA",
                                               help=field_help("evaluate.grad_targets")),
    per_class: bool = typer.Option(False, "--per-class", help="also print a table of test accuracy per class "
                                                              "(the JSON reports always hold it)"),
    data: Optional[DatasetName] = DataOpt, data_root: Optional[Path] = DataRootOpt,
    out: str = typer.Option("", "--out", "-o", metavar="DIR",
                            help="write DIR/report.json and print its path (default: write nothing)"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt,
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Evaluate checkpoints on the test split of the data each was made from: a table on stderr, the JSON
    reports with --json, report.json with --out."""
    from bcpkd_cli.stages import evaluate as stage
    _one_process("evaluate")
    trust(everything=trust_code)

    tree = _tree(recipe, set_, {"device": device, "data.name": data, "data.root": data_root,
                                "evaluate.grad_targets": grad_targets})
    config = checked(tree, _source(recipe))  # report every problem before any work
    if print_config:
        return _print_config(config, ("device", "evaluate"))
    paths = [p if stage.is_export(p) else artifacts.resolve_checkpoint(p, stage.CHECKPOINT_FORMATS, "evaluate")
             for p in checkpoints]
    for p in paths:  # and with the data each is evaluated on: a network of images given vectors, ...
        if not stage.is_export(p):
            checked(tree, str(p), artifacts.load_checkpoint(p, stage.CHECKPOINT_FORMATS))
    path, reports = stage.run(tree, paths, out, force, per_class)
    if as_json:
        print(json.dumps(reports, indent=2))
    elif path is not None:
        print(path)


@app.command()
def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml", help="YAML recipe with an `experiment` section"),
    data_root: Optional[Path] = DataRootOpt,
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="reuse the teachers and students an interrupted run of "
                                                        "this recipe finished in --out; continue the others"),
    force: bool = typer.Option(False, "--force", help="train every teacher and student again over what --out "
                                                      "holds"),
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Run every stage of a recipe and print the comparison table (summary.json path on stdout)."""
    from bcpkd_cli import pipeline
    _one_process("run")
    trust(everything=trust_code)

    tree = _tree(recipe, set_, {"out": out, "device": device, "data.root": data_root})
    config = checked(tree, _source(recipe))
    if print_config:
        print(yaml.safe_dump(to_plain(config), sort_keys=False), end="")
        return
    _check_resume(resume, force, out)
    print(pipeline.run(tree, str(recipe), resume, force, plot_figures=importlib.util.find_spec("matplotlib") is not None))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="student.pt or teacher.pt (or its run folder)"),
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="the export folder (default: <checkpoint "
                                                                    "folder>/export)"),
    formats: Optional[str] = typer.Option(None, "--format", metavar="onnx,pt2,safetensors",
                                          help="the files to write (default: every one that applies; onnx needs the "
                                               "export extra)"),
    draws: int = typer.Option(0, "--draws", metavar="K", help="vi and mc-dropout teachers: K fixed seeded draws "
                                                              "averaged in the graph instead of the mean network"),
    force: bool = typer.Option(False, "--force", help="replace the export --out holds"),
    trust_code: bool = TrustOpt,
) -> None:
    """Export a student (or a teacher's calibrated predictive) as model.onnx, model.pt2 and model.safetensors with
    bcpkd-export.json and a model card (README.md), each file checked against the checkpoint on the test split.
    The folder's path goes to stdout."""
    from bcpkd_cli.choices import ExportFormat
    from bcpkd_cli.stages import export as stage
    _one_process("export")
    trust(everything=trust_code)

    chosen = None
    if formats:
        names = [f.strip() for f in formats.split(",") if f.strip()]
        unknown = [f for f in names if f not in [e.value for e in ExportFormat]]
        if unknown or not names:
            raise BcpkdError(f"--format {formats}: choose from onnx, pt2, safetensors (comma-separated)")
        chosen = [ExportFormat(f) for f in names]
    if draws < 0:
        raise BcpkdError(f"--draws {draws}: give K >= 1 draws, or leave it out for the mean network")
    path = artifacts.resolve_checkpoint(checkpoint, (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT), "export")
    print(stage.run(path, out, chosen, draws, force, shlex.join(["bcpkd", *sys.argv[1:]])))


@app.command()
def predict(
    model: str = typer.Argument(..., metavar="MODEL", help="student.pt, teacher.pt, model.onnx, model.pt2 or an "
                                                           "export folder"),
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="image files or folders (recursive), or "
                                                                      ".csv/.npz files of feature rows"),
    out: str = typer.Option("", "--out", "-o", metavar="FILE.csv|FILE.jsonl",
                            help="write the rows there (default: CSV on stdout)"),
    top_k: int = typer.Option(3, "--top-k", metavar="K", help="classes listed per input, most probable first"),
    batch_size: int = typer.Option(64, "--batch-size", help="inputs per batch"),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="list unreadable inputs on stderr and "
                                                                         "exit 0 (default: exit 2 after the rows)"),
    draws: int = typer.Option(0, "--draws", metavar="K", help="a vi or mc-dropout teacher.pt: K fixed seeded draws "
                                                              "instead of the mean network"),
    trust_code: bool = TrustOpt,
) -> None:
    """Classify new inputs: CSV rows of input, class, probability, top-k, entropy and, for Bayesian teachers, the
    epistemic part (mutual information, or the Laplace logit variance)."""
    from bcpkd_cli.stages import predict as stage
    _one_process("predict")
    trust(everything=trust_code)
    if top_k < 1 or batch_size < 1:
        raise BcpkdError(f"--top-k {top_k} / --batch-size {batch_size}: give positive numbers")
    stage.run(model, inputs, out, top_k, batch_size, skip_unreadable, draws)


@app.command()
def plot(
    paths: list[Path] = typer.Argument(..., metavar="RUN_OR_CHECKPOINT...",
                                       help="run folders of `bcpkd run`, or teacher.pt / student.pt files"),
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="the folder the figures go to"),
    force: bool = typer.Option(False, "--force", help="replace the figures --out already holds"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt, trust_code: bool = TrustOpt,
) -> None:
    """Draw figures (needs the plot extra: pip install -e '.[plot]'): reliability diagrams, held-out curves
    (mean and band over seeds), noise against Dirichlet alpha with the theory, accuracy against MC draws.
    Each PNG has its data beside it as CSV; their paths go to stdout."""
    from bcpkd_cli.stages import plot as stage
    _one_process("plot")
    trust(everything=trust_code)

    tree = _tree(None, set_, {"device": device})
    checked(tree, "options")
    print("\n".join(str(p) for p in stage.run(paths, out, tree, force)))


def _set_with_a_space(argv: list[str]) -> None:
    """`--set key value` (a space instead of =): the same message as other --set mistakes, before Typer reads
    `value` as a stray argument."""
    for flag, item, following in zip(argv, argv[1:], argv[2:] + [""]):
        if flag in ("--set", "-s") and "=" not in item:
            example = f"{item}={following}" if following and not following.startswith("-") else f"{item}=VALUE"
            raise BcpkdError(f"--set {item!r}: expected section.key=value, e.g. --set {example}")


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        reset_trust()
        _set_with_a_space(sys.argv[1:])
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
