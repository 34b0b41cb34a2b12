"""The authors' protocol one setting away: training on every image (no held-out split), and the settings
the paper's recipes use."""

from __future__ import annotations

import json

import torch

from cli_helpers import here, refused_here

TINY = ["--set", "data.n_train=300", "--set", "data.n_test=100", "--set", "teacher.hidden=[16]",
        "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32", "--set", "distill.log_every=5",
        "--device", "cpu"]


def test_no_heldout_split_when_nothing_is_tuned_on_it(single_thread, tmp_path):
    no_heldout = [*TINY, "--set", "data.n_heldout=0"]
    message = refused_here("train-teacher", "--bayes", "temperature", "--out", "t0", *no_heldout, cwd=tmp_path)
    assert "data.n_heldout=0" in message and "tunes on held-out data" in message
    teacher = here("train-teacher", "--bayes", "laplace", "--prior", "marglik", "--epochs", "2", "--out", "t",
                   *no_heldout, cwd=tmp_path).strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    assert payload["data"]["sizes"] == {"train": 300, "heldout": 0, "test": 100} and payload["history"]["heldout"] == {}
    message = refused_here("distill", "--teacher", teacher, "--out", "s0", *no_heldout, cwd=tmp_path)
    assert "calibrate.prior=keep" in message
    student = here("distill", "--teacher", teacher, "--set", "calibrate.prior=keep", "--t-teacher", "2",
                   "--set", "calibrate.temper=predictive", "--out", "s", *no_heldout, cwd=tmp_path).strip()
    report = json.loads(here("evaluate", student, "--json", "--device", "cpu", cwd=tmp_path))[0]
    assert report["metrics"]["convergence_noise_nll"] is None and 0 <= report["metrics"]["accuracy"] <= 1
    assert all(set(entry) == {"step"} for entry in torch.load(tmp_path / student, weights_only=True)["log"])
