"""--resume: a run continued from the state saved at an epoch end ends exactly where an uninterrupted
run ends (weights, optimiser and schedule, batch order, logs); wrong uses are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli import artifacts, resumption
from bcpkd_cli.config import Optimizer, build_recipe
from bcpkd_cli.engine import Member, TrainSpec, train_lockstep
from bcpkd_cli.resumption import Resume
from bcpkd_cli.teachers import training as teacher_training
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.stages import train_teacher
from cli_helpers import here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


def _members(seed: int = 0) -> list[Member]:
    """An SGD-momentum member with a step schedule and an Adam member, both logging."""
    def cross_entropy(logits, labels, _):
        return F.cross_entropy(logits, labels, reduction="none")

    def log(model):
        return {"norm": model.head.weight.norm().item()}

    out = []
    for k, optimizer in enumerate((Optimizer.sgd, Optimizer.adam)):
        torch.manual_seed(seed + k)
        model = build_model(model_spec("mlp", (30,), 5, (16,), dropout=0.1))  # dropout: the torch RNG matters
        spec = TrainSpec(4, 32, optimizer, 0.05 if optimizer == Optimizer.sgd else 1e-3, 0.9, 1e-4, seed,
                         lr_milestones=(2,))
        out.append(Member(model, cross_entropy, spec, log))
    return out


def _train(tiny_data, members, resume=None) -> int:
    def batch(rows, epoch):
        return tiny_data.train.inputs[rows], [None] * len(members)

    return train_lockstep(members, tiny_data.train.labels, 4, 32, 0, "test", batch, log_every=5, resume=resume)


def test_resumed_training_equals_uninterrupted_training(tiny_data, tmp_path):
    paths = []

    def save(state: dict) -> None:  # through a file, as a run does: the state must load with weights_only
        paths.append(artifacts.save_training_state(tmp_path / f"after-{state['epoch']}.pt", state, {"k": 1}))

    whole = _members()
    steps = _train(tiny_data, whole, Resume(save))
    assert [p.name for p in paths] == ["after-1.pt", "after-2.pt", "after-3.pt", "after-4.pt"]
    for path in paths[:3]:  # interrupted after each epoch, then resumed from that state
        continued = _members(seed=100)  # another initialisation: everything comes from the state
        resume = Resume(lambda state: None, artifacts.load_training_state(path, {"k": 1})[0])
        assert _train(tiny_data, continued, resume) == steps
        for a, b in zip(whole, continued):
            for name, value in a.model.state_dict().items():
                assert torch.equal(value, b.model.state_dict()[name]), (path.name, name)
            assert a.log == b.log and len(a.log) == steps // 5 + 1


def test_settings_leave_out_paths_identified_by_content():
    plain = {"data": {"name": "imagefolder", "root": "a"}, "calibrate": {"batch_size": 7, "views": 8},
             "teacher": {"bayes": "ensemble", "base": "x/teacher.pt", "epochs": 3,
                         "ensemble": {"checkpoints": ["m.pt"], "members": 5}, "vi": {"samples": 20}}}
    settings = resumption.settings_of(plain, ("data", "calibrate", "teacher", "precision"))
    assert settings == {"data": {"name": "imagefolder"}, "calibrate": {"views": 8}, "precision": None,
                        "teacher": {"bayes": "ensemble", "epochs": 3, "ensemble": {"members": 5}}}  # not vi's
    assert plain["teacher"]["base"] == "x/teacher.pt" and plain["data"]["root"] == "a"  # a copy was trimmed


def test_a_state_saved_with_other_settings_is_refused(tmp_path):
    path = artifacts.save_training_state(tmp_path / "s.pt", {"epoch": 1}, {"distill": {"alpha": 1.0, "lr": 0.1}})
    with pytest.raises(BcpkdError, match=r"other settings \(distill.alpha\)"):
        artifacts.load_training_state(path, {"distill": {"alpha": 0.5, "lr": 0.1}})


def test_every_teacher_phase_resumes_and_finished_phases_do_not_train_again(tmp_path, monkeypatch):
    """An ensemble's members are phases; states of finished phases restore their weights (no epochs run)."""
    tree = {"data": {"n_train": 200, "n_heldout": 50, "n_test": 50}, "device": "cpu", "out": str(tmp_path / "t"),
            "teacher": {"bayes": "ensemble", "hidden": [8], "epochs": 2, "batch_size": 50, "ensemble": {"members": 2}}}
    monkeypatch.setattr(train_teacher, "finish", lambda folder: None)  # keep the states, as a kill would
    first = torch.load(train_teacher.run(build_recipe(tree)), weights_only=True)
    assert sorted(p.name for p in (tmp_path / "t").glob("train-state*")) == ["train-state-member1.pt",
                                                                             "train-state-member2.pt"]
    (tmp_path / "t" / "teacher.pt").unlink()
    monkeypatch.setattr(train_teacher, "finish", resumption.finish)
    calls, real_train = [], teacher_training.train

    def train(*args, **kwargs):
        calls.append(kwargs["resume"].start["epoch"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(teacher_training, "train", train)
    other_stages = {**tree, "distill": {"alpha": 0.5}, "calibrate": {"batch_size": 7}}  # not the teacher's settings
    again = torch.load(train_teacher.run(build_recipe(other_stages), resume=True), weights_only=True)
    assert calls == [2, 2]  # both members came back from their final states
    for a, b in zip(first["posterior"]["members"], again["posterior"]["members"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any((tmp_path / "t").glob("train-state*"))  # a finished run keeps no states


TINY = ["--set", "data.n_train=600", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "teacher.epochs=1", "--set", "distill.hidden=[16]",
        "--set", "distill.batch_size=8", "--set", "distill.log_every=50", "--device", "cpu"]


@pytest.mark.slow
def test_a_killed_distill_resumes_to_the_uninterrupted_student(tmp_path, capsys):
    teacher = here("train-teacher", "--out", "t", *TINY, cwd=tmp_path).strip()
    distill = ["distill", "--teacher", teacher, "--epochs", "8", *TINY]  # killed early in a long run
    whole = tmp_path / here(*distill, "--out", "whole", cwd=tmp_path).strip()
    job = subprocess.Popen([sys.executable, "-m", "bcpkd_cli", *distill, "--out", "cut"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONWARNINGS": "ignore",  # the threads of this process
                                "OMP_NUM_THREADS": str(torch.get_num_threads())})
    while not (tmp_path / "cut" / "train-state.pt").exists() and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # a preempted job: no clean-up of any kind
    job.wait()
    assert not (tmp_path / "cut" / "student.pt").exists(), "the run ended before it could be killed"
    capsys.readouterr()
    assert here(*distill, "--out", "cut", "--resume", cwd=tmp_path).strip() == "cut/student.pt"
    assert "resuming student of deterministic teacher t/teacher.pt after epoch" in capsys.readouterr().err  # not afresh
    a, b = torch.load(whole, weights_only=True), torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["log"] == b["log"] and a["history"]["grad_noise"] == b["history"]["grad_noise"]
    assert not (tmp_path / "cut" / "train-state.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["distill", "--targets", "true", "--resume"], "--resume: give --out FOLDER"),
    (["distill", "--targets", "true", "--resume", "--out", "nothing-here"], "holds no train-state"),
    (["train-teacher", "--resume", "--out", "nothing-here"], "holds no train-state"),
])
def test_resume_without_an_interrupted_run_is_refused(tmp_path, args, message):
    assert message in refused_here(*args, cwd=tmp_path)
    assert not any(tmp_path.iterdir())
