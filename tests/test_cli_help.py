"""The CLI's option help comes from config.py: every typed flag says what its config field says."""

from __future__ import annotations

import dataclasses
import typing

import typer.main

from bcpkd_cli.cli import app
from bcpkd_cli.commands.options import field_help
from bcpkd_cli.config import Recipe, config_field

# Typed flags and the recipe key each one sets (the flags without a key are the CLI's own).
FLAG_KEYS = {
    "train-teacher": {"bayes": "teacher.bayes", "epochs": "teacher.epochs", "seed": "teacher.seed",
                      "base": "teacher.base", "subset": "teacher.laplace.subset", "hessian": "teacher.laplace.hessian",
                      "prior": "teacher.laplace.prior", "link": "teacher.laplace.link",
                      "members": "teacher.ensemble.members", "device": "device"},
    "calibrate": {"prior": "calibrate.prior", "temperature": "calibrate.temperature",
                  "t_teacher": "distill.t_teacher", "device": "device"},
    "distill": {"targets": "distill.targets", "alpha": "distill.alpha", "t_teacher": "distill.t_teacher",
                "t_student": "distill.t_student", "dirichlet_alpha": "distill.dirichlet_alpha",
                "epochs": "distill.epochs", "seed": "distill.seed", "temperature": "calibrate.temperature",
                "out": "out", "device": "device"},
    "evaluate": {"grad_targets": "evaluate.grad_targets", "device": "device"},
}


def test_typed_flags_carry_the_config_fields_help_and_default():
    commands = typer.main.get_command(app).commands
    for command, keys in FLAG_KEYS.items():
        params = {p.name: p for p in commands[command].params}
        for name, dotted in keys.items():
            help_text = params[name].help
            assert config_field(dotted).metadata["help"] in help_text, (command, name)
            if dotted != "out":
                assert help_text == field_help(dotted), (command, name)


def test_field_help_shows_the_default():
    assert field_help("teacher.epochs") == "training epochs [default: 60]"
    assert field_help("teacher.bayes") == "teacher kind [default: none]"
    assert field_help("teacher.hidden") == "hidden layer widths [default: 256,256]"
    assert field_help("teacher.base") == config_field("teacher.base").metadata["help"]  # no empty default


def test_every_config_field_has_one_line_of_help():
    seen = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help") and "\n" not in f.metadata["help"], prefix + f.name
            seen.append(prefix + f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Recipe)
    assert "teacher.laplace.hessian" in seen
