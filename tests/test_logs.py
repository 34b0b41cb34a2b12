"""What a batch job leaves for a person who reads its log later, and for `bcpkd plot`: a first line naming what
each stage runs and where it writes, epoch lines that begin with the time, labels that say what the network is,
an interruption (Ctrl-C, or SIGTERM as SLURM sends it) that names the exact command that continues, and held-out
curves from teachers as from students."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from bcpkd_cli import artifacts
from bcpkd_cli.cli import resume_command
from bcpkd_cli.engine import TrainSpec, train
from bcpkd_cli.steps import (LOG_MIN_EXAMPLES, LOG_POINTS, HeldoutCurve, batch_bounds, heldout_sample, log_interval,
                             log_plan)
from bcpkd_cli.choices import Optimizer
from bcpkd_cli.console import TrainingReport
from cli_helpers import bcpkd, default_sigint, here, here_run

TINY = ["--set", "data.n_train=300", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32",
        "--set", "teacher.laplace.grid_size=3", "--set", "calibrate.batch_size=256", "--device", "cpu"]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"  # ISO 8601, local time, to the second

pytestmark = pytest.mark.usefixtures("single_thread")  # the jobs too (OMP_NUM_THREADS=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A deterministic teacher and a student of a laplace teacher, as batch jobs (stderr to a pipe)."""
    folder = tmp_path_factory.mktemp("logs")
    deterministic = bcpkd("train-teacher", "--epochs", "2", "--batch-size", "8", "--out", "det", *TINY, cwd=folder)
    here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", "lap", *TINY, cwd=folder)
    student = bcpkd("distill", "--teacher", "lap/teacher.pt", "--epochs", "2", "--out", "s", *TINY, cwd=folder)
    return {"folder": folder, "deterministic": deterministic.stderr, "student": student.stderr}


def _header(stderr: str, command: str) -> tuple[int, str]:
    lines = stderr.splitlines()
    found = [(i, text) for i, text in enumerate(lines) if re.match(f"{STAMP} {command}: ", text)]
    assert len(found) == 1, stderr
    return found[0]


def test_a_stage_begins_with_what_it_runs_on_what_data_and_where_it_writes(runs):
    at, teacher = _header(runs["deterministic"], "train-teacher")
    assert re.fullmatch(rf"{STAMP} train-teacher: deterministic teacher mlp, 2 epochs of batch 8 \(adam lr 0\.001, "
                        rf"seed 0\), data synthetic \(300 train examples\), device cpu -> det", teacher), teacher
    assert at < runs["deterministic"].splitlines().index(next(text for text in runs["deterministic"].splitlines()
                                                              if text.startswith("data: ")))  # before the data lines
    at, student = _header(runs["student"], "distill")
    assert re.fullmatch(rf"{STAMP} distill: student mlp of laplace teacher lap/teacher\.pt \(targets teacher, alpha "
                        rf"1\.0, T_t 1\.0, T_s 1\.0\), 2 epochs of batch 32 \(sgd lr 0\.01, seed 0\), data synthetic "
                        rf"\(300 train examples\), device cpu -> s", student), student
    assert runs["student"].splitlines()[at + 1].startswith("data: ")


def test_epoch_lines_of_batch_jobs_begin_with_the_time_of_day(runs):
    for stderr in (runs["deterministic"], runs["student"]):
        epochs = [text for text in stderr.splitlines() if re.search(r" epoch \d+/2: loss", text)]
        assert len(epochs) == 2, stderr
        for text in epochs:
            when = datetime.fromisoformat(text.split(" ", 1)[0])
            assert abs((datetime.now() - when).total_seconds()) < 600 and re.match(f"{STAMP} ", text)


def test_labels_say_what_the_network_is(runs):
    assert "training deterministic teacher: " in runs["deterministic"]
    assert re.search(f"{STAMP} deterministic teacher epoch 1/2: ", runs["deterministic"])
    assert "training student of laplace teacher lap/teacher.pt: " in runs["student"]
    assert "calibrating laplace teacher lap/teacher.pt" in runs["student"]
    assert re.search(r"^student of laplace teacher lap/teacher\.pt: \d+ steps", runs["student"], re.MULTILINE)
    assert "none teacher" not in runs["deterministic"] + runs["student"]
    assert "student (teacher)" not in runs["student"]


def test_teachers_log_held_out_curves_as_students_do(runs):
    folder = runs["folder"]
    teacher_log = [json.loads(text) for text in (folder / "det" / "metrics.jsonl").read_text().splitlines()]
    student_log = [json.loads(text) for text in (folder / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(teacher_log) >= LOG_POINTS and len(student_log) >= LOG_POINTS
    assert {tuple(entry) for entry in teacher_log} == {tuple(entry) for entry in student_log} == \
        {("step", "heldout_nll", "heldout_accuracy")}
    steps = [entry["step"] for entry in teacher_log]  # 300 / 8: 38 steps per epoch, 76 in all, every 76 // 20
    assert steps == list(range(0, 76, 3)) + [76]
    assert torch.load(folder / "det" / "teacher.pt", weights_only=True)["log"] == teacher_log  # as a student's
    assert torch.load(folder / "s" / "student.pt", weights_only=True)["log"] == student_log


def test_what_bcpkd_chose_for_automatic_settings_is_written_beside_them(runs, tmp_path):
    """threads: 0 and log_every: 0 stay as given (config.yaml is the recipe as given, for --recipe); the values the
    run used are in the checkpoint's history and beside those keys in config.yaml, as comments."""
    folder = runs["folder"]
    for name, file, section in (("det", "teacher.pt", "teacher"), ("s", "student.pt", "distill")):
        payload = torch.load(folder / name / file, weights_only=True)
        history, text = payload["history"], (folder / name / "config.yaml").read_text()
        steps = [json.loads(entry)["step"] for entry in (folder / name / "metrics.jsonl").read_text().splitlines()]
        assert history["threads"] == 1  # OMP_NUM_THREADS=1 (single_thread)
        assert history["log_every"] == steps[1] - steps[0] == {"det": 3, "s": 1}[name]
        assert "\nthreads: 0  # automatic: 1 in this run\n" in text, text
        assert f"\n{section}:\n" in text and \
            f"\n  log_every: 0  # automatic: {history['log_every']} in this run\n" in text, text
        assert history["log_examples"] == 100  # automatic: all 100 held-out examples
        assert "\n  log_examples: 0  # automatic: 100 in this run\n" in text, text
        assert yaml.safe_load(text) == payload["config"]  # the settings as given: a recipe that chooses again
    record = {"threads": 4, "distill": {"log_every": 0, "hidden": [8]}}
    written = artifacts.write_config(tmp_path, record, {"threads": 4, "distill.log_every": 7}).read_text()
    assert written.splitlines()[:3] == ["threads: 4", "distill:", "  log_every: 0  # automatic: 7 in this run"]
    record = {"out": "", "data": {"n_train": 0, "n_heldout": -1, "n_test": 100}}  # left unset, and one set
    sizes = {"out": "runs/x", "data.n_train": 900, "data.n_heldout": 100, "data.n_test": 100}
    assert artifacts.write_config(tmp_path, record, sizes).read_text().splitlines() == [
        "out: ''  # automatic: runs/x in this run", "data:", "  n_train: 0  # automatic: 900 in this run",
        "  n_heldout: -1  # automatic: 100 in this run", "  n_test: 100"]


def test_each_entry_of_a_teacher_trained_in_phases_names_its_phase(tmp_path):
    here("train-teacher", "--bayes", "ensemble", "--members", "2", "--epochs", "1", "--batch-size", "64", "--out", "e",
         *TINY, cwd=tmp_path)
    log = [json.loads(text) for text in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    steps = list(range(6))  # 300 / 64: 5 steps, each logged (and the end)
    assert [(entry["phase"], entry["step"]) for entry in log] == [(m, s) for m in ("member1", "member2") for s in steps]
    payload = torch.load(tmp_path / "e" / "teacher.pt", weights_only=True)
    assert payload["log"] == log
    assert payload["history"]["log_every"] == {"member1": 1, "member2": 1}  # per phase, as the log names them
    assert "  log_every: 0  # automatic: 1 in this run\n" in (tmp_path / "e" / "config.yaml").read_text()


@pytest.mark.parametrize("total_steps", [1, 7, 19, 20, 21, 39, 204, 1000, 78_200])
@pytest.mark.parametrize("steps_per_epoch", [1, 5, 391])
def test_the_automatic_log_interval_gives_20_entries_and_one_per_epoch(total_steps, steps_per_epoch):
    every = log_interval(0, total_steps, steps_per_epoch)
    entries = len(range(0, total_steps, every)) + 1  # and the last step
    assert entries >= min(LOG_POINTS, total_steps + 1) and every <= steps_per_epoch
    assert log_interval(50, total_steps, steps_per_epoch) == 50  # a chosen interval is kept
    assert log_interval(0, 2 * len(batch_bounds(300, 8)), len(batch_bounds(300, 8))) == 3  # the teacher above


def test_the_resume_command_is_the_typed_one_with_the_folder_and_resume():
    typed = ["distill", "--teacher", "runs/t/teacher.pt", "--epochs", "10", "--set", "distill.hidden=[16]"]
    assert resume_command(typed, Path("runs/s")) == \
        "bcpkd distill --teacher runs/t/teacher.pt --epochs 10 --set 'distill.hidden=[16]' --out runs/s --resume"
    assert resume_command(["train-teacher", "-o", "t", "--force"], Path("t")) == "bcpkd train-teacher -o t --resume"
    assert resume_command(["distill", "--out=s", "--resume"], Path("s")) == "bcpkd distill --out=s --resume"
    assert resume_command(["distill", "--force"], Path("s"), resume=False) == "bcpkd distill --force --out s"


def _interrupt(args: list[str], cwd: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start the CLI, send `sig` once the state of its first epoch is saved; its exit code and stderr."""
    job = subprocess.Popen([sys.executable, "-m", "bcpkd_cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    seen = []
    for text in job.stderr:  # the first line names the folder
        seen.append(text)
        if re.match(f"{STAMP} distill: ", text):
            break
    state = cwd / text.rstrip("\n").rsplit(" -> ", 1)[1] / "train-state.pt"
    while not state.exists() and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(sig)
    stdout, rest = job.communicate(timeout=120)
    assert stdout == ""  # no artifact path: nothing finished
    return job.returncode, "".join(seen) + rest


SLOW_EPOCHS = ["--targets", "true", "--epochs", "4", "--set", "data.n_train=1000", "--set", "data.n_heldout=100",
               "--set", "data.n_test=100", "--set", "distill.hidden=[8]", "--set", "distill.batch_size=8",
               "--device", "cpu"]  # 125 steps an epoch: a signal arrives long before the end


def test_a_preempted_run_names_the_command_that_continues_it(tmp_path):
    code, stderr = _interrupt(["distill", *SLOW_EPOCHS], tmp_path, signal.SIGTERM)  # as SLURM preempts a job
    assert code == 143, stderr
    said = re.search(r"^terminated \(SIGTERM\): (runs/student-true-[\d-]+) holds the state of epoch (\d+) of 4; "
                     r"continue with: (.+)$", stderr, re.MULTILINE)
    assert said, stderr
    folder, epoch, command = said.groups()
    assert command == shlex.join(["bcpkd", "distill", *SLOW_EPOCHS, "--out", folder, "--resume"])  # generated folder
    assert not (tmp_path / folder / "student.pt").exists()
    bcpkd_args = shlex.split(command)
    assert bcpkd_args[0] == "bcpkd"
    resumed = here_run(*bcpkd_args[1:], cwd=tmp_path)  # (in this process: the command is what is checked)
    assert f"resuming student (exact BCPs) after epoch {epoch} " in resumed.stderr
    assert resumed.stdout.strip() == f"{folder}/student.pt" and (tmp_path / folder / "student.pt").is_file()


def test_ctrl_c_names_the_given_folder_and_the_saved_epoch(tmp_path):
    # 40 epochs, not 4: nothing resumes this run, and the last three epochs could end before a loaded machine delivers
    # the signal (the run then finishes and prints its student)
    code, stderr = _interrupt(["distill", *SLOW_EPOCHS, "--epochs", "40", "--out", "s"], tmp_path, signal.SIGINT)
    assert code == 130, stderr
    assert re.search(r"^interrupted: s holds the state of epoch \d+ of 40; continue with: bcpkd distill .* --out s "
                     r"--resume$", stderr, re.MULTILINE), stderr
    assert stderr.count("--out s") == 1


def test_the_training_header_says_what_the_held_out_curve_measures(runs):
    assert "; held-out curve every 3 steps on all 100 held-out examples" in runs["deterministic"]
    assert "; held-out curve every step on all 100 held-out examples" in runs["student"]


def test_an_epoch_line_shows_the_log_entry_of_its_last_step(runs):
    """300 / 32: 10 steps per epoch, an entry every step: the epoch lines repeat the entries of steps 10 and 20."""
    log = {entry["step"]: entry for entry in map(json.loads, (runs["folder"] / "s" / "metrics.jsonl").read_text()
                                                  .splitlines())}
    lines = [text for text in runs["student"].splitlines() if re.search(r" epoch \d/2: loss", text)]
    for text, step in zip(lines, (10, 20)):
        assert f"held-out accuracy {log[step]['heldout_accuracy']:.4f}, held-out nll {log[step]['heldout_nll']:.4f}" \
            in text, text


@pytest.mark.parametrize("n, n_heldout, epochs, log_examples, expected", [
    (5_000, 1_000, 2, 0, (4, 1_000)),  # 22 entries of a 2-epoch run: half of training affords 681, at least 2,048
    (5_000, 10_000, 2, 0, (4, LOG_MIN_EXAMPLES)),  # more held-out examples than that: the least
    (20_000, 10_000, 2, 0, (15, 2_727)),  # 22 entries: as many as half of training affords
    (50_000, 50_000, 200, 0, (391, 50_000)),  # one entry per epoch: all of them
    (5_000, 1_000, 2, 300, (4, 300)),  # as set
    (5_000, 1_000, 2, 10**6, (4, 1_000)),  # at most all
    (5_000, 0, 2, 0, (4, 0)),  # data.n_heldout=0: none
])
def test_the_automatic_held_out_curve_costs_at_most_half_of_training(n, n_heldout, epochs, log_examples, expected):
    plan = log_plan(0, log_examples, n, n_heldout, 128, epochs)
    assert (plan.interval, plan.examples) == expected
    if log_examples == 0 and LOG_MIN_EXAMPLES < plan.examples < n_heldout:
        entries = epochs * len(batch_bounds(n, 128)) // plan.interval + 2
        assert entries * plan.examples <= 0.5 * 3 * epochs * n  # inference passes vs training's forward + backward


def test_the_held_out_sample_is_fixed_in_order_and_nested():
    small, large = heldout_sample(1_000, 100), heldout_sample(1_000, 400)
    assert torch.equal(small, heldout_sample(1_000, 100)) and torch.equal(small, small.sort().values)
    assert len(small.unique()) == 100 and set(small.tolist()) <= set(large.tolist())
    assert torch.equal(heldout_sample(50, 100), torch.arange(50))
    inputs, labels = torch.randn(1_000, 3), torch.arange(1_000) % 2
    curve = HeldoutCurve(inputs, labels, 100)
    assert torch.equal(curve.inputs, inputs[small]) and torch.equal(curve.labels, labels[small])
    assert curve.describe(4) == "held-out curve every 4 steps on 100 of 1,000 held-out examples"


@pytest.mark.parametrize("log_every, entries, measured", [(5, [0, 5, 10, 15, 20], 5),  # epoch ends are entries
                                                         (3, [0, 3, 6, 9, 12, 15, 18, 20], 9)])  # step 10 is not
def test_epoch_ends_measure_the_held_out_curve_once(tiny_data, log_every, entries, measured):
    """An epoch end that is a log entry's step shows that entry (one evaluation); another is measured for the
    line of a batch job; a run that is resumed does not log a step twice (entries are unique)."""
    calls: list[int] = []

    def curve(model):
        calls.append(1)
        return {"heldout_nll": 1.0, "heldout_accuracy": 0.5}

    model = torch.nn.Linear(tiny_data.train.inputs.shape[1], tiny_data.n_classes)
    spec = TrainSpec(epochs=2, batch_size=32, optimizer=Optimizer.sgd, lr=0.01, momentum=0.0, weight_decay=0.0,
                     seed=0)
    log: list[dict] = []
    report = TrainingReport("test")
    report.lines = True  # a batch job: its epoch lines show held-out metrics
    train(model, tiny_data.train.inputs[:320], tiny_data.train.labels[:320], None,
          lambda logits, labels, targets: torch.nn.functional.cross_entropy(logits, labels, reduction="none"), spec,
          "test", log_every=log_every, curve=curve, report=report, log=log)
    assert [entry["step"] for entry in log] == entries and len(calls) == measured


def test_a_teachers_config_carries_only_its_own_kinds_settings(runs):
    deterministic = torch.load(runs["folder"] / "det" / "teacher.pt", weights_only=True)["config"]["teacher"]
    laplace = torch.load(runs["folder"] / "lap" / "teacher.pt", weights_only=True)["config"]["teacher"]
    kinds = {"laplace", "vi", "mc_dropout", "ensemble", "mcmi"}
    assert not kinds & set(deterministic) and kinds & set(laplace) == {"laplace"}
    assert "vi:" not in (runs["folder"] / "det" / "config.yaml").read_text()
