"""The training commands: train-teacher, calibrate (optional) and distill, each a thin step from flags to a recipe
to its stage. Under torchrun they share their work across processes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bcpkd_cli.choices import (Bayes, DatasetName, Hessian, Link, PriorMethod, PriorTuning, Subset, Targets,
                               TemperatureFit)
from bcpkd_cli.commands.options import (NORMALIZE, TEACHERS_DATA, DeviceOpt, ForceOpt, OutOpt, PrintConfigOpt,
                                        ResumeOpt, TrustOpt, check_resume, checked, config_option, data_option,
                                        data_root_option, field_help, recipe_option, recipe_tree, say_data,
                                        say_unused_teacher_sets, set_option, show_config, source_of, teacher_checkpoint)
from bcpkd_cli.config import (RUN_KEYS, STUDENT_RECORD, TEACHER_RECORD, build_recipe, merge, parse_sweep,
                              set_path)
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models.foreign import trust
from bcpkd_cli.teachers import TEACHER_KINDS


def train_teacher(
    recipe: Optional[Path] = recipe_option("YAML recipe (default: the embedded synthetic benchmark)"),
    bayes: Optional[Bayes] = config_option("teacher.bayes"),
    arch: Optional[str] = typer.Option(None, metavar="ARCH", help=field_help("teacher.arch")),
    init: Optional[Path] = typer.Option(None, metavar="WEIGHTS", help=field_help("teacher.init")),
    normalize: Optional[str] = typer.Option(None, metavar=NORMALIZE, help=field_help("teacher.normalize")),
    epochs: Optional[int] = config_option("teacher.epochs"),
    lr: Optional[float] = config_option("teacher.lr"),
    batch_size: Optional[int] = config_option("teacher.batch_size"),
    seed: Optional[int] = config_option("teacher.seed"),
    data: Optional[DatasetName] = data_option(), data_root: Optional[Path] = data_root_option(),
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
    out: str = OutOpt, device: Optional[str] = DeviceOpt,
    set_: Optional[list[str]] = set_option("teacher.hidden=[512,512]"),
    resume: bool = ResumeOpt, force: bool = ForceOpt, print_config: bool = PrintConfigOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Train a teacher of any kind and save a self-describing teacher.pt (path printed on stdout).
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli train-teacher ..."""
    from bcpkd_cli.engine import in_process_group
    from bcpkd_cli.stages import train_teacher as stage

    trust(everything=trust_code)
    tree = recipe_tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                      "teacher.bayes": bayes, "teacher.arch": arch, "teacher.init": init,
                                      "teacher.normalize": normalize, "teacher.epochs": epochs,
                                      "teacher.lr": lr, "teacher.batch_size": batch_size, "teacher.seed": seed,
                                      "teacher.base": base, "teacher.laplace.subset": subset,
                                      "teacher.laplace.hessian": hessian, "teacher.laplace.prior": prior,
                                      "teacher.laplace.link": link, "teacher.ensemble.members": members,
                                      "teacher.ensemble.checkpoints": [str(m) for m in member] if member else None})
    if samples is not None:  # the samples of the chosen kind
        kind = build_recipe(tree, source_of(recipe)).teacher.bayes
        key = TEACHER_KINDS[kind].samples_key
        if key is None:
            raise BcpkdError(f"--samples: a {kind.value} teacher draws no samples; use it with --bayes vi, "
                             f"mc-dropout or laplace (--link mc)")
        set_path(tree, f"teacher.{key}", samples)
    config = checked(tree, source_of(recipe))
    if print_config:
        return show_config(config, TEACHER_RECORD)
    check_resume(resume, force, out)
    with in_process_group():  # under torchrun: data-parallel training; rank 0 writes and prints
        path = stage.run(config, resume, force)
    if path is not None:
        print(path)


def calibrate(
    teacher: Path = typer.Option(..., metavar="TEACHER.pt", help="teacher.pt from train-teacher (or its folder)"),
    recipe: Optional[Path] = recipe_option("YAML recipe, for its calibrate keys and distill.t_teacher, not its data "
                                           f"section (default: built-in settings, on {TEACHERS_DATA})"),
    prior: Optional[PriorTuning] = config_option("calibrate.prior"),
    temperature: Optional[TemperatureFit] = config_option("calibrate.temperature"),
    t_teacher: Optional[float] = config_option("distill.t_teacher"),
    views: Optional[int] = config_option("calibrate.views"),
    data: Optional[DatasetName] = data_option(TEACHERS_DATA),
    data_root: Optional[Path] = data_root_option(TEACHERS_DATA),
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="cache folder (default: <teacher folder>/bcp/<key>)"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = set_option("calibrate.cache_dtype=float16"),
    force: bool = typer.Option(False, "--force", help="build the cache again even where one exists"),
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Calibrate a teacher on held-out data and cache its BCPs for the training split (path on stdout).
    The data are the teacher's own unless --data, --data-root or --set data.KEY=V change them (a recipe's data
    section does not: a line says so where it differs).
    In shards on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli calibrate ..."""
    from bcpkd_cli.engine import in_process_group
    from bcpkd_cli.stages import calibrate as stage

    trust(everything=trust_code)

    tree = recipe_tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                      "calibrate.prior": prior, "calibrate.temperature": temperature,
                                      "calibrate.views": views, "distill.t_teacher": t_teacher}, recipe_data=False)
    teacher, payload = teacher_checkpoint(teacher)
    say_unused_teacher_sets(set_, payload, teacher)
    config = checked(tree, source_of(recipe), payload)
    say_data(recipe, tree, payload, teacher)
    if print_config:
        return show_config(config, (*RUN_KEYS, "data", "calibrate", "distill"))
    with in_process_group():  # under torchrun: each process computes a shard of the cache; rank 0 writes the rest
        path = stage.run(config, teacher, force)
    if path is not None:
        print(path)


def distill(
    teacher: Optional[Path] = typer.Option(None, metavar="TEACHER.pt",
                                           help="teacher.pt or its folder (its cached BCPs are found or built)"),
    cache: Optional[Path] = typer.Option(None, metavar="BCP.safetensors",
                                         help="bcp.safetensors from `calibrate --out` (default: found by key)"),
    recipe: Optional[Path] = recipe_option("YAML recipe, for its distill and calibrate keys, and its data section "
                                           f"without --teacher (default: built-in settings, on {TEACHERS_DATA}; "
                                           f"synthetic without --teacher)"),
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
    data: Optional[DatasetName] = data_option(f"{TEACHERS_DATA}; synthetic without --teacher"),
    data_root: Optional[Path] = data_root_option(f"{TEACHERS_DATA}; synthetic without --teacher"),
    sweep: Optional[list[str]] = typer.Option(None, metavar="KEY=V1,V2",
                                              help="train a grid of students in lockstep, one pass over the data, "
                                                   "over distill keys (repeat for a product grid); students go to "
                                                   "OUT/KEY=V-..., paths one per line"),
    out: str = OutOpt, device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = set_option("distill.lr=0.05"),
    resume: bool = ResumeOpt, force: bool = ForceOpt, print_config: bool = PrintConfigOpt,
    trust_code: bool = TrustOpt,
) -> None:
    """Train a student against the teacher's cached BCPs; save student.pt (path on stdout).
    The data are the teacher's own unless --data, --data-root or --set data.KEY=V change them (a recipe's data
    section does not: a line says so where it differs).
    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m bcpkd_cli distill ..."""
    from bcpkd_cli.engine import in_process_group
    from bcpkd_cli.stages import distill as stage

    trust(everything=trust_code)
    tree = recipe_tree(recipe, set_, {"out": out, "device": device, "data.name": data, "data.root": data_root,
                                      "distill.targets": targets, "distill.arch": arch, "distill.init": init,
                                      "distill.normalize": normalize, "distill.alpha": alpha,
                                      "distill.t_teacher": t_teacher, "distill.t_student": t_student,
                                      "distill.dirichlet_alpha": dirichlet_alpha, "distill.epochs": epochs,
                                      "distill.lr": lr, "distill.batch_size": batch_size, "distill.seed": seed,
                                      "calibrate.temperature": temperature, "calibrate.views": views},
                       recipe_data=teacher is None)
    grid = parse_sweep(sweep or [])
    payload = None
    if teacher is not None:
        teacher, payload = teacher_checkpoint(teacher)
        say_unused_teacher_sets(set_, payload, teacher)
    configs = [checked(merge(tree, {"distill": point}), source_of(recipe), payload) for point in grid]
    if payload is not None:
        say_data(recipe, tree, payload, teacher)
    if print_config:
        with_cache = configs[0].distill.targets in (Targets.teacher, Targets.online)
        return show_config(configs[0], (*STUDENT_RECORD, "calibrate") if with_cache else STUDENT_RECORD)
    check_resume(resume, force, out)
    with in_process_group():  # under torchrun: one process per GPU (or CPU share); rank 0 writes and prints
        paths = stage.run_sweep(configs, grid, teacher, cache, out, resume, force) if sweep else \
            [p for p in [stage.run(configs[0], teacher, cache, resume, force)] if p is not None]
    if paths:
        print("\n".join(str(p) for p in paths))


