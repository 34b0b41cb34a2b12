"""What a newcomer meets in the first hour, through the real CLI: reports that describe the checkpoint they
measured, nothing overwritten, options that can be found, lines for batch jobs, files recognised."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from bcpkd_cli import artifacts
from bcpkd_cli.tuning import describe_tuning
from bcpkd_cli.config import build_recipe
from bcpkd_cli.teachers.laplace import grid_search
from bcpkd_cli.teachers.temperature import fit_temperature
from cli_helpers import files_under, here, here_run, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

TINY = ["--set", "data.n_train=300", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32",
        "--set", "distill.log_every=5", "--set", "teacher.laplace.grid_size=5", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(single_thread, tmp_path_factory):
    """A laplace teacher (2 epochs) and a student of it, made as a shell script makes them."""
    folder = tmp_path_factory.mktemp("first-hour")
    teacher = here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", "t", *TINY, cwd=folder).strip()
    student = here("distill", "--teacher", "t", "--alpha", "0.5", "--out", "s", *TINY, cwd=folder).strip()
    return {"folder": folder, "teacher": folder / teacher, "student": folder / student}


# -------------------------------------------------------------------- 1. reports describe what they measured

def test_a_report_describes_exactly_the_checkpoint_it_measured(work):
    reports = json.loads(here("evaluate", str(work["student"]), str(work["teacher"]), "--json", "--device", "cpu",
                              cwd=work["folder"]))
    student, teacher = reports
    student_payload = torch.load(work["student"], weights_only=True)
    teacher_payload = torch.load(work["teacher"], weights_only=True)
    assert teacher["config"] == teacher_payload["config"] and student["config"] == student_payload["config"]
    assert teacher["config"]["teacher"]["epochs"] == 2 and teacher["config"]["teacher"]["bayes"] == "laplace"
    measured = {"metrics": None, "config": None, "data": None, "evaluate": None, "reliability": None, "per_class": None,
                "confusion": None}
    assert teacher | measured == {
        "checkpoint": str(work["teacher"]), "sha256": artifacts.sha256_file(work["teacher"]), "kind": "teacher",
        "arch": "mlp", "normalize": "data", "teacher_kind": "laplace", "calibrated": False,
        "label": "laplace teacher (raw)", "split": "test", "n_examples": 100, **measured}
    assert [entry["class"] for entry in teacher["per_class"]] == ["0", "1", "2", "3", "4"]
    assert sum(entry["n"] for entry in teacher["per_class"]) == 100
    assert student["targets"] == "teacher" and student["alpha"] == 0.5 and student["t_teacher"] == 1.0
    assert student["teacher"] == str(work["teacher"].resolve()) and student["teacher_kind"] == "laplace"
    assert student["teacher_sha256"] == artifacts.sha256_file(work["teacher"])
    assert student["calibrated"] is True  # calibrate's default grid search tuned the prior
    calibrated = torch.load(student["teacher_report"]["checkpoint"], weights_only=True)  # beside the cache
    prior = calibrated["history"]["calibration"]["prior_precision"]
    assert student["label"] == f"student of laplace teacher (calibrated, prior precision {prior:.3g}) t/teacher.pt"
    assert student["teacher_report"]["label"] == f"laplace teacher (calibrated, prior precision {prior:.3g})"
    assert Path(student["teacher_report"]["checkpoint"]) == Path(student["cache"]).parent / "teacher.pt"
    assert set(student["metrics"]) >= {"accuracy", "nll", "ece", "brier", "grad_noise"}
    one = json.loads(here("evaluate", str(work["teacher"]), "--json", "--device", "cpu", cwd=work["folder"]))
    assert isinstance(one, list) and len(one) == 1  # --json is always a list, one object per checkpoint given
    alone = json.loads(here("evaluate", str(work["student"]), "--json", "--device", "cpu", cwd=work["folder"]))
    assert len(alone) == 1 and alone[0]["teacher_report"]["checkpoint"] == student["teacher_report"]["checkpoint"]


def test_a_students_config_holds_the_sections_that_made_it(work):
    saved = yaml.safe_load((work["student"].parent / "config.yaml").read_text())
    assert "teacher" not in saved and "experiment" not in saved and "evaluate" not in saved
    assert saved["distill"]["alpha"] == 0.5 and "calibrate" in saved  # its targets came through a calibration
    onehot = here("distill", "--targets", "onehot", "--out", "o", *TINY, cwd=work["folder"]).strip()
    assert "calibrate" not in yaml.safe_load((work["folder"] / Path(onehot).parent / "config.yaml").read_text())
    build_recipe(saved)  # a valid recipe


@pytest.mark.slow
def test_an_image_students_config_does_not_claim_synthetic_settings(image_folder, tmp_path):
    data = ["--data", "imagefolder", "--data-root", str(image_folder), "--set", "data.n_heldout=15",
            "--device", "cpu"]
    here("distill", "--targets", "onehot", "--arch", "wrn_16_1", "--epochs", "1", "--batch-size", "30", "--out", "s",
         *data, cwd=tmp_path)
    saved = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert saved["data"]["name"] == "imagefolder" and "n_classes" not in saved["data"] and "dim" not in saved["data"]
    payload = torch.load(tmp_path / "s" / "student.pt", weights_only=True)
    assert payload["data"]["n_classes"] == 3 and payload["data"]["sizes"] == {"train": 75, "heldout": 15, "test": 24}


# ------------------------------------------------------------------------------ 2. nothing overwritten

def test_a_finished_run_is_not_replaced(work):
    folder, before = work["folder"], work["student"].read_bytes()
    message = refused_here("distill", "--teacher", "t", "--out", "s", *TINY, cwd=folder)
    assert "s/student.pt" in message and "--force" in message
    assert work["student"].read_bytes() == before
    message = refused_here("train-teacher", "--bayes", "laplace", "--out", "t", *TINY, cwd=folder)
    assert "t/teacher.pt" in message and "--force" in message
    here("evaluate", "s", "--out", "e", "--device", "cpu", cwd=folder)
    assert "--force" in refused_here("evaluate", "s", "--out", "e", "--device", "cpu", cwd=folder)


def test_force_replaces_and_an_interrupted_folder_asks_which(work, tmp_path):
    here("distill", "--targets", "onehot", "--epochs", "1", "--out", "s", *TINY, cwd=tmp_path)
    first = (tmp_path / "s" / "student.pt").read_bytes()
    here("distill", "--targets", "onehot", "--epochs", "1", "--seed", "3", "--out", "s", "--force", *TINY,
         cwd=tmp_path)
    assert (tmp_path / "s" / "student.pt").read_bytes() != first
    (tmp_path / "cut").mkdir()
    artifacts.save_training_state(tmp_path / "cut" / "train-state.pt", {"epoch": 1}, {})
    message = refused_here("distill", "--targets", "onehot", "--out", "cut", *TINY, cwd=tmp_path)
    assert "interrupted run" in message and "--resume" in message and "--force" in message
    assert refused_here("distill", "--targets", "onehot", "--out", "cut", "--resume", "--force", *TINY,
                        cwd=tmp_path).count("choose one")


def test_run_refuses_a_finished_run_folder(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("{}")
    recipe = str(Path(__file__).parents[1] / "recipes" / "synthetic.yaml")
    message = refused_here("run", recipe, "--out", "r", cwd=tmp_path)
    assert "r/summary.json" in message and "--resume" in message and "--force" in message


# ------------------------------------------------------------------------------ 3. options you can find

def test_version_and_typed_flags(work, tmp_path):
    assert re.fullmatch(r"bcpkd \d+\.\d+\.\d+\n", here("--version", cwd=tmp_path))
    help_text = here_run("train-teacher", "--help", cwd=tmp_path).stdout
    for flag in ("--arch", "--epochs", "--lr", "--batch-size", "--data", "--data-root", "--force", "--print-config"):
        assert flag in help_text
    assert "[default: 60]" in help_text
    assert "[default: resnet20 for images, mlp for vectors]" in " ".join(help_text.split())  # the data decide
    assert re.search(r"--resume\s+continue", help_text)  # a boolean flag shows no value


def test_print_config_runs_nothing(tmp_path):
    printed = here("train-teacher", "--bayes", "vi", "--epochs", "30", "--lr", "0.01", "--print-config", cwd=tmp_path)
    config = yaml.safe_load(printed)
    assert config["teacher"]["bayes"] == "vi" and config["teacher"]["epochs"] == 30 and config["teacher"]["lr"] == 0.01
    assert "distill" not in config and files_under(tmp_path) == set()
    assert build_recipe(config).teacher.epochs == 30


def test_set_with_a_space_gets_the_set_message(tmp_path):
    message = refused_here("train-teacher", "--set", "teacher.epochs", "5", cwd=tmp_path)
    assert "--set 'teacher.epochs'" in message and "--set teacher.epochs=5" in message


def test_the_readme_settings_table_matches_config():
    """The README's 'settings you will change first' table: every key exists, with the default config.py gives."""
    from bcpkd_cli.commands.options import field_help

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## The settings you will change first", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert len(rows) >= 10
    for key, flag, default, _ in ([cell.strip().strip("`") for cell in row] for row in rows):
        assert f"[default: {default}]" in field_help(key), key
        if flag:
            assert flag.startswith("--")


# ------------------------------------------------------------------------------ 4. lines for batch jobs

def test_batch_jobs_get_a_line_per_epoch_naming_the_job(tmp_path):
    result = here_run("distill", "--targets", "true", "--epochs", "3", "--sweep", "alpha=0.5,1.0", "--out", "sw",
                      *TINY, cwd=tmp_path)  # stderr not a terminal, as a batch job's (real ones: test_logs.py)
    lines = result.stderr.splitlines()
    for alpha in ("0.5", "1.0"):
        epochs = [line for line in lines if f"[alpha={alpha}] epoch" in line]
        assert len(epochs) == 3 and all(re.search(r"loss \d\.\d{4}, held-out accuracy \d\.\d{4}", e) for e in epochs)
        assert any(line.startswith(f"student (exact BCPs) [alpha={alpha}]: ") for line in lines)


@pytest.mark.slow
def test_tensorboard_logs_under_the_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    here("train-teacher", "--epochs", "2", "--out", "t", "--set", "log.tensorboard=true", *TINY, cwd=tmp_path)
    events = list((tmp_path / "t" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]
    assert "train/heldout_accuracy" in accumulator.Tags()["scalars"]


# ------------------------------------------------------------------------------ 5. files recognised

def test_misused_files_get_their_own_message(work):
    folder = work["folder"]
    reports = json.loads(here("evaluate", "s", "--json", "--device", "cpu", cwd=folder))  # a run folder
    assert reports[0]["checkpoint"] == "s/student.pt"
    cache = next((folder / "t" / "bcp").glob("*/bcp.safetensors")).relative_to(folder)
    message = refused_here("distill", "--teacher", str(cache), *TINY, cwd=folder)
    assert "is a BCP cache" in message and f"--cache {cache}" in message
    message = refused_here("distill", "--teacher", str(cache.parent / "teacher.pt"), *TINY, cwd=folder)
    assert "already calibrated" in message and str(work["teacher"].resolve()) in message
    message = refused_here("evaluate", "t/bcp", cwd=folder)
    assert "did you mean" in message and "teacher.pt" in message


# ------------------------------------------------------------------------------ 6. searches at an edge

def test_a_grid_optimum_at_the_edge_widens_the_grid(capsys):
    best, searched = grid_search(lambda v: (math.log10(v) - 6.2) ** 2, -2.0, 2.0, 5, "prior precision")
    assert best == pytest.approx(1e6) and searched[1] >= 1e6
    assert "top of the grid" in capsys.readouterr().err
    best, _ = grid_search(lambda v: (math.log10(v) - 1.0) ** 2, -2.0, 2.0, 5, "prior precision")
    assert best == pytest.approx(10.0) and capsys.readouterr().err == ""


def test_a_temperature_beyond_the_search_interval_is_found():
    logits = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0)) * 40.0
    labels = torch.distributions.Categorical(logits=logits / 60.0).sample()
    fitted = fit_temperature(lambda t: torch.softmax(logits / t, dim=1), labels)
    assert 40.0 < fitted < 90.0  # beyond the first interval's top of 20


def test_tuned_values_are_said_in_a_sentence():
    sentence = describe_tuning({"heldout_examples": 2500, "prior_precision": 6.3096, "prior_method": "gridsearch",
                                "prior_grid": [1e-4, 1e4], "temperature": 1.2345})
    assert sentence == ("tuned on 2500 held-out examples: prior precision 6.31 (by held-out NLL over a grid "
                        "0.0001 .. 1e+04) and temperature 1.234 (by held-out NLL)")
    assert describe_tuning({"heldout_examples": 10}) is None


# ------------------------------------------------------------------------------ 7. small things

def test_sizes_are_checked_before_any_work(image_folder, tmp_path):
    recipe = str(Path(__file__).parents[1] / "recipes" / "cifar10-cpu.yaml")
    message = refused_here("run", recipe, "--data-root", str(image_folder), "--out", "r", cwd=tmp_path)
    assert "data.n_train=8000" in message and "90 training images" in message
    assert files_under(tmp_path) == set()


def test_evaluate_without_out_writes_nothing(work, tmp_path):
    here("evaluate", str(work["teacher"]), "--device", "cpu", cwd=tmp_path)
    assert files_under(tmp_path) == set()
