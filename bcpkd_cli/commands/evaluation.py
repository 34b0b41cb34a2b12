"""The commands that measure and compare: evaluate, run (every stage of a recipe) and plot. Each runs in one
process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import typer
import yaml

from bcpkd_cli import artifacts
from bcpkd_cli.choices import DatasetName
from bcpkd_cli.commands.options import (DeviceOpt, OutOpt, PrintConfigOpt, TrustOpt, check_resume, checked, data_option,
                                        data_root_option, field_help, one_process, recipe_option, recipe_tree,
                                        say_data, set_option, show_config, source_of)
from bcpkd_cli.config import to_plain
from bcpkd_cli.models.foreign import trust

CHECKPOINTS_DATA = "the data each checkpoint was made from"


def evaluate(
    checkpoints: list[Path] = typer.Argument(..., metavar="CHECKPOINT...",
                                             help="teacher.pt or student.pt files (or their run folders), or "
                                                  "exported model.onnx / model.pt2 files or folders"),
    recipe: Optional[Path] = recipe_option("YAML recipe, for its evaluate keys, not its data section (default: "
                                           f"built-in settings, on {CHECKPOINTS_DATA})"),
    as_json: bool = typer.Option(False, "--json", help="print the reports on stdout as JSON: a list with one "
                                                       "object per checkpoint"),
    grad_targets: Optional[str] = typer.Option(None, metavar="onehot,true,noisy:ALPHA",
                                               help=field_help("evaluate.grad_targets")),
    per_class: bool = typer.Option(False, "--per-class", help="also print a table of test accuracy per class "
                                                              "(the JSON reports always hold it)"),
    data: Optional[DatasetName] = data_option(CHECKPOINTS_DATA),
    data_root: Optional[Path] = data_root_option(CHECKPOINTS_DATA),
    out: str = typer.Option("", "--out", "-o", metavar="DIR",
                            help="write DIR/report.json and print its path (default: write nothing)"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = set_option("evaluate.ece_bins=20"),
    force: bool = typer.Option(False, "--force", help="replace the report.json --out already holds"),
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Evaluate checkpoints on the test split of the data each was made from: a table on stderr, the JSON
    reports with --json, report.json with --out."""
    from bcpkd_cli.stages import evaluate as stage
    one_process("evaluate")
    trust(everything=trust_code)

    tree = recipe_tree(recipe, set_, {"device": device, "data.name": data, "data.root": data_root,
                                      "evaluate.grad_targets": grad_targets}, recipe_data=False)
    config = checked(tree, source_of(recipe))  # report every problem before any work
    if print_config:
        return show_config(config, ("device", "evaluate"))
    paths = [p if stage.is_export(p) else artifacts.resolve_checkpoint(p, stage.CHECKPOINT_FORMATS, "evaluate")
             for p in checkpoints]
    for p in paths:  # and with the data each is evaluated on: a network of images given vectors, ...
        if not stage.is_export(p):
            payload = artifacts.load_checkpoint(p, stage.CHECKPOINT_FORMATS)
            checked(tree, str(p), payload)
            say_data(recipe, tree, payload, p)
    path, reports = stage.run(tree, paths, out, force, per_class)
    if as_json:
        print(json.dumps(reports, indent=2))
    elif path is not None:
        print(path)


def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml", help="YAML recipe with an `experiment` section"),
    data_root: Optional[Path] = data_root_option(),
    out: str = OutOpt, device: Optional[str] = DeviceOpt,
    set_: Optional[list[str]] = set_option("experiment.seeds=[0]"),
    resume: bool = typer.Option(False, "--resume", help="reuse the teachers and students an interrupted run of "
                                                        "this recipe finished in --out; continue the others"),
    force: bool = typer.Option(False, "--force", help="train every teacher and student again over what --out "
                                                      "holds"),
    print_config: bool = PrintConfigOpt, trust_code: bool = TrustOpt,
) -> None:
    """Run every stage of a recipe and print the comparison table (summary.json path on stdout)."""
    from bcpkd_cli import pipeline
    one_process("run")
    trust(everything=trust_code)

    tree = recipe_tree(recipe, set_, {"out": out, "device": device, "data.root": data_root})
    config = checked(tree, source_of(recipe))
    if print_config:
        print(yaml.safe_dump(to_plain(config), sort_keys=False), end="")
        return
    check_resume(resume, force, out)
    print(pipeline.run(tree, str(recipe), resume, force, plot_figures=importlib.util.find_spec("matplotlib") is not None))


def plot(
    paths: list[Path] = typer.Argument(..., metavar="RUN_OR_CHECKPOINT...",
                                       help="run folders of `bcpkd run`, or teacher.pt / student.pt files"),
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="the folder the figures go to (required)"),
    force: bool = typer.Option(False, "--force", help="replace the figures --out already holds"),
    device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = set_option("evaluate.ece_bins=20"),
    trust_code: bool = TrustOpt,
) -> None:
    """Draw figures (needs the plot extra: pip install -e '.[plot]'): reliability diagrams, held-out curves
    (mean and band over seeds), noise against Dirichlet alpha with the theory, accuracy against MC draws.
    Each PNG has its data beside it as CSV; their paths go to stdout."""
    from bcpkd_cli.stages import plot as stage
    one_process("plot")
    trust(everything=trust_code)

    tree = recipe_tree(None, set_, {"device": device})
    checked(tree, "options")
    print("\n".join(str(p) for p in stage.run(paths, out, tree, force)))
