"""Data-parallel distillation under torchrun (gloo on the CPU): the same students as one process.

Every process draws the same batch order and takes every second row of each batch (uneven shares,
and none at all for one process in the last batch); gradients are averaged into the whole batch's
mean, so a few steps give the single-process weights up to float summation order. Only rank 0
writes and prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_helpers import files_under, here, refused_here, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]  # the workers run one thread each

# 601 examples in batches of 150: five steps per epoch, the last of one row, so that one process has
# none (longer runs drift apart at float rounding)
SMALL = ["--set", "data.n_train=601", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
         "--set", "teacher.hidden=[16]", "--set", "teacher.epochs=2", "--set", "teacher.batch_size=150",
         "--set", "distill.hidden=[16]",
         "--set", "distill.epochs=1", "--set", "distill.batch_size=150", "--set", "distill.log_every=2",
         "--device", "cpu"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_student(one: Path, many: Path) -> None:
    a, b = weights(one), weights(many)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert torch.load(many, weights_only=True)["history"]["processes"] == 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("ddp")
    return work, work / here("train-teacher", "--out", "t", *SMALL, cwd=work).strip()


def test_two_processes_train_the_single_process_student(teacher):
    work, teacher_path = teacher
    one = work / here("distill", "--teacher", str(teacher_path), "--out", "one", *SMALL, cwd=work).strip()
    result = torchrun("distill", "--teacher", str(teacher_path), "--out", "two", *SMALL, cwd=work)
    assert result.stdout.strip() == "two/student.pt"  # one path, printed by rank 0 only
    assert {p.name for p in files_under(work / "two")} == {p.name for p in files_under(work / "one")}
    assert_same_student(one, work / "two" / "student.pt")
    history_one, history_two = (torch.load(p, weights_only=True)["history"] for p in (one, work / "two" / "student.pt"))
    assert history_one["grad_noise_examples"] == history_two["grad_noise_examples"] == 601  # each process half
    assert history_two["grad_noise"] == pytest.approx(history_one["grad_noise"], rel=1e-4)
    log_one = torch.load(one, weights_only=True)["log"]
    log_two = torch.load(work / "two" / "student.pt", weights_only=True)["log"]
    assert [e["step"] for e in log_two] == [e["step"] for e in log_one] == [0, 2, 4]  # 2 steps an epoch: a last
    # batch of one example joins the one before


def test_two_processes_train_the_single_process_teacher(teacher):
    work, one = teacher
    result = torchrun("train-teacher", "--out", "t-two", *SMALL, cwd=work)
    assert result.stdout.strip() == "t-two/teacher.pt"
    a, b = weights(one), weights(work / "t-two" / "teacher.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert {p.name for p in files_under(work / "t-two")} == {"teacher.pt", "config.yaml", "metrics.jsonl"}


def test_accumulated_batches_under_torchrun_train_the_single_process_student(teacher):
    """Two processes stepping on 2 accumulated batches of 75 (gradients averaged across them on the second only:
    no_sync) train the student of one process with batches of 150, on the same per-step linear schedule."""
    work, teacher_path = teacher
    schedule = ["--set", "distill.schedule=linear", "--set", "distill.warmup=1"]
    one = work / here("distill", "--teacher", str(teacher_path), "--out", "one-b150", *SMALL, *schedule,
                      cwd=work).strip()
    torchrun("distill", "--teacher", str(teacher_path), "--out", "two-75x2", *SMALL, *schedule,
             "--set", "distill.batch_size=75", "--set", "distill.accumulate=2", cwd=work)
    assert_same_student(one, work / "two-75x2" / "student.pt")
    log = torch.load(work / "two-75x2" / "student.pt", weights_only=True)["log"]
    assert [e["step"] for e in log] == [0, 2, 4]  # optimizer steps, as one process with batches of 150


def test_a_lockstep_sweep_with_an_online_teacher_under_torchrun(teacher):
    work, teacher_path = teacher
    sweep = ["distill", "--teacher", str(teacher_path), "--targets", "online", "--sweep", "alpha=0.5,1.0", *SMALL]
    one = here(*sweep, "--out", "sweep-one", cwd=work).split()
    many = torchrun(*sweep, "--out", "sweep-two", cwd=work).stdout.split()
    assert [Path(p).relative_to("sweep-two") for p in many] == [Path(p).relative_to("sweep-one") for p in one]
    for a, b in zip(one, many):
        assert_same_student(work / a, work / b)


@pytest.mark.parametrize("command", [["evaluate", "s.pt"], ["run", "recipes/synthetic.yaml"]])
def test_other_commands_refuse_to_run_under_torchrun(tmp_path, monkeypatch, command):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert "without torchrun" in refused_here(*command, cwd=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_user_factory_trains_data_parallel(teacher, tmp_path):
    """Your own network under torchrun: every process builds it from the name its command line gives."""
    work, teacher_path = teacher
    (tmp_path / "mine.py").write_text("from torch import nn\n\n\ndef make(num_classes, width=8):\n"
                                      "    return nn.Sequential(nn.Linear(30, width), nn.ReLU(), "
                                      "nn.Linear(width, num_classes))\n")
    args = ["distill", "--teacher", str(teacher_path), "--arch", "mine.py:make", *SMALL]
    one = tmp_path / here(*args, "--out", "one", cwd=tmp_path).strip()
    many = tmp_path / torchrun(*args, "--out", "many", cwd=tmp_path).stdout.strip()
    assert_same_student(one, many)
