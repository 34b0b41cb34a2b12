"""The commands as a user meets them: each command's help is true for that command (where its data come from, what
a recipe gives it, a --set example of a key it reads), and tables in logs keep every column name whole."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main
import yaml
from rich.table import Table
from typer.testing import CliRunner

from bcpkd_cli.cli import app
from bcpkd_cli.config import config_field
from bcpkd_cli.console import console, show_table
from cli_helpers import here

RECIPES = Path(__file__).parents[1] / "recipes"
COMMANDS = ["train-teacher", "calibrate", "distill", "evaluate", "run", "export", "predict", "plot"]  # in order
TEACHERS = "the data the teacher was made from"
# What --data and --data-root say the data are without them, and what --recipe says is used without a recipe.
DATA_DEFAULT = {"train-teacher": "[default: synthetic]", "calibrate": f"(default: {TEACHERS})",
                "distill": f"(default: {TEACHERS}; synthetic without --teacher)",
                "evaluate": "(default: the data each checkpoint was made from)"}
RECIPE_DEFAULT = {"train-teacher": "(default: the embedded synthetic benchmark)",
                  "calibrate": f"(default: built-in settings, on {TEACHERS})",
                  "distill": f"(default: built-in settings, on {TEACHERS}; synthetic without --teacher)",
                  "evaluate": "(default: built-in settings, on the data each checkpoint was made from)"}
TINY = ["--device", "cpu", "--set", "data.n_train=200", "--set", "data.n_heldout=50", "--set", "data.n_test=50"]


def shown_help(command: str) -> str:
    """`bcpkd COMMAND --help` as a user reads it, its lines joined."""
    result = CliRunner().invoke(app, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def options(command: str) -> dict[str, str]:
    """The help of each option of `command`, by parameter name."""
    return {p.name: p.help or "" for p in typer.main.get_command(app).commands[command].params}


def set_example(command: str) -> tuple[str, str]:
    """The key and value of the `--set KEY=VALUE` example in the help of `command`."""
    found = re.search(r"e\.g\. --set ([\w.]+)=(\S+) \(repeatable\)", options(command)["set_"])
    assert found, options(command)["set_"]
    return found.group(1), found.group(2)


def test_the_commands_in_pipeline_order():
    assert list(typer.main.get_command(app).commands) == COMMANDS


def test_data_and_recipe_help_say_where_each_commands_data_come_from():
    for command in COMMANDS:
        shown, flags = shown_help(command), options(command)
        if command in DATA_DEFAULT:
            assert flags["data"].endswith(DATA_DEFAULT[command]) and DATA_DEFAULT[command] in shown, command
            assert flags["recipe"].endswith(RECIPE_DEFAULT[command]) and RECIPE_DEFAULT[command] in shown, command
        if command in DATA_DEFAULT and command != "train-teacher":
            assert flags["data_root"].endswith(DATA_DEFAULT[command]), command
            assert "[default: synthetic]" not in shown and "embedded synthetic" not in shown, command
    assert "(default: " not in options("train-teacher")["data_root"]  # no data without data.name


def test_only_train_teacher_shows_teacher_keys_as_set_examples():
    for command in ["", *COMMANDS]:
        assert ("teacher.hidden" in shown_help(command)) == (command == "train-teacher"), command
    assert {command for command in COMMANDS if "set_" in options(command)} == \
        {"train-teacher", "calibrate", "distill", "evaluate", "run", "plot"}
    assert set_example("plot")[0].startswith("evaluate.")  # the checkpoints plot evaluates itself
    config_field(set_example("plot")[0])


def printed_config(*args: str, cwd: Path) -> dict:
    return yaml.safe_load(here(*args, "--print-config", cwd=cwd))


def value_at(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_each_set_example_is_a_key_the_command_reads(single_thread, tmp_path):
    """--print-config shows the keys a command reads: each example's value lands there."""
    teacher = here("train-teacher", "--epochs", "1", "--set", "teacher.hidden=[8]", *TINY, "--out", "t",
                   cwd=tmp_path).strip()
    needs = {"calibrate": ["--teacher", teacher], "evaluate": ["not-read-by-print-config.pt"],
             "run": [str(RECIPES / "synthetic.yaml")]}
    for command in ("train-teacher", "calibrate", "distill", "evaluate", "run"):
        key, value = set_example(command)
        config = printed_config(command, *needs.get(command, []), "--set", f"{key}={value}", cwd=tmp_path)
        assert value_at(config, key) == yaml.safe_load(value), command
        without = printed_config(command, *needs.get(command, []), cwd=tmp_path)
        assert value_at(without, key) != yaml.safe_load(value), command  # an example that changes something


def test_a_table_in_a_log_keeps_every_column_name_whole(capsys):
    names = [f"convergence_{what}_of_the_student" for what in ("rate", "speed", "nll", "ece", "brier", "kl", "tv",
                                                                 "accuracy", "entropy", "noise")]
    table = Table(title="test-split evaluation (200 examples)")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")
    table.add_row("runs/distill-0/student.pt", *(f"{i / 10:.4g}" for i in range(10)))
    width = console.width
    show_table(table)
    printed = capsys.readouterr().err
    assert not console.is_terminal and console.width == width  # a log, and the console as it was
    header = next(text for text in printed.splitlines() if "model" in text)
    assert all(name in header for name in names) and "…" not in printed  # one header line, nothing cut
    assert len(header) > width  # wider than the console's lines: rich alone would have cut the names


def test_a_recipe_data_section_does_not_replace_the_teachers_data_and_a_line_says_so(single_thread, tmp_path, capsys):
    """calibrate, distill and evaluate take the data a checkpoint was made from; --data, --data-root and --set
    data.KEY=V change them, a recipe's data section does not (one line names what differs and the --set that would
    use it); without --teacher, distill takes the recipe's data."""
    teacher = here("train-teacher", "--epochs", "1", "--set", "teacher.hidden=[8]", *TINY, "--out", "t",
                   cwd=tmp_path).strip()
    (tmp_path / "r.yaml").write_text("data: {n_train: 120, n_heldout: 50, n_test: 50, seed: 3}\n"
                                     "distill: {hidden: [4], epochs: 1}\n")
    capsys.readouterr()
    said = "data: as t/teacher.pt was made from (n_train 200, seed 0), not as the data section of recipe r.yaml says " \
           "(n_train 120, seed 3); to use the recipe's, add --set data.n_train=120 --set data.seed=3"
    for command in ("calibrate", "distill"):
        config = printed_config(command, "-r", "r.yaml", "--teacher", teacher, cwd=tmp_path)
        assert (config["data"]["n_train"], config["data"]["seed"]) == (200, 0), command  # the teacher's
        assert capsys.readouterr().err.splitlines() == [said], command
    config = printed_config("distill", "-r", "r.yaml", "--teacher", teacher, "--set", "data.seed=3", cwd=tmp_path)
    assert (config["data"]["n_train"], config["data"]["seed"], config["distill"]["hidden"]) == (200, 3, [4])
    assert capsys.readouterr().err.splitlines() == [said.replace(", seed 0", "").replace(", seed 3", "").replace(
        " --set data.seed=3", "")]  # the --set chose the seed: only n_train differs from the recipe's
    config = printed_config("distill", "-r", "r.yaml", "--targets", "onehot", cwd=tmp_path)
    assert (config["data"]["n_train"], config["data"]["seed"]) == (120, 3)  # no teacher: the recipe's data
    assert capsys.readouterr().err == ""
    here("evaluate", teacher, "-r", "r.yaml", "--json", cwd=tmp_path)
    assert said.replace("t/teacher.pt", teacher) in capsys.readouterr().err.splitlines()
    assert "not its data section" in options("calibrate")["recipe"] and \
        "not its data section" in options("evaluate")["recipe"]
    assert "its data section without --teacher" in options("distill")["recipe"]
