"""Gradient noise at the final weights on a seeded sample of training examples (distill.grad_noise_examples,
evaluate.grad_noise_examples): seeded, reported with its size, `all` the full measurement exactly, 0 off."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.config import build_recipe
from bcpkd_cli.data import load_dataset
from bcpkd_cli.grad_noise import per_example_grad_sq_norms
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.grad_noise import sample_rows
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model
from bcpkd_cli.stages import distill, evaluate, train_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = {"device": "cpu", "data": {"n_train": 300, "n_heldout": 100, "n_test": 100},
        "teacher": {"hidden": [16], "epochs": 3, "batch_size": 32},
        "distill": {"hidden": [8], "epochs": 2, "batch_size": 16, "alpha": 0.7}}


def student(tmp_path, teacher, name: str, **settings) -> tuple[dict, object]:
    recipe = build_recipe({**BASE, "out": str(tmp_path / name), "distill": {**BASE["distill"], **settings}})
    return torch.load(distill.run(recipe, teacher), weights_only=True), recipe


def full_norms(payload: dict, recipe) -> torch.Tensor:
    """||grad loss_i||^2 of every training example against the student's view-0 targets, as distill measured
    it before the sample (one pass over all examples)."""
    data = load_dataset(recipe.data)
    cfg = recipe.distill
    if cfg.targets.value == "true":
        targets = data.train.true_bcp
    else:
        targets = artifacts.load_cache(payload["targets"]["cache"], {})[0][:, 0].float()
    model = build_model(payload["model"], payload["state_dict"])

    def loss_fn(logits, labels, target_probs):
        return kd_loss(logits, labels, target_probs, cfg.alpha, cfg.t_teacher, cfg.t_student)

    return per_example_grad_sq_norms(model, data.train.inputs, data.train.labels, targets, loss_fn)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train_teacher.run(build_recipe({**BASE, "out": str(tmp_path_factory.mktemp("teacher") / "t")}))


def test_the_sample_is_seeded_sorted_and_sized():
    a, b = sample_rows(1000, "100", seed=3), sample_rows(1000, "100", seed=3)
    assert torch.equal(a, b) and len(a) == 100 and len(a.unique()) == 100 and bool((a.diff() > 0).all())
    assert not torch.equal(a, sample_rows(1000, "100", seed=4))
    assert torch.equal(sample_rows(1000, "all", seed=3), torch.arange(1000))
    assert torch.equal(sample_rows(300, "2048", seed=3), torch.arange(300))  # more than there are: all, in order
    assert len(sample_rows(1000, "0", seed=3)) == 0


@pytest.mark.parametrize("targets", ["teacher", "true"])
def test_all_is_the_full_measurement_exactly(tmp_path, teacher, targets):
    payload, recipe = student(tmp_path, teacher, "all", targets=targets, grad_noise_examples="all")
    assert payload["history"]["grad_noise_examples"] == 300
    assert payload["history"]["grad_noise"] == full_norms(payload, recipe).mean().item()


def test_a_sample_is_seeded_and_near_the_full_value(tmp_path, teacher):
    whole, recipe = student(tmp_path, teacher, "all", grad_noise_examples="all")
    sampled = [student(tmp_path, teacher, f"k{i}", grad_noise_examples=150)[0] for i in range(2)]
    assert sampled[0]["history"] == {**sampled[1]["history"], "seconds": sampled[0]["history"]["seconds"]}
    assert sampled[0]["history"]["grad_noise_examples"] == 150
    norms = full_norms(whole, recipe)
    rows = sample_rows(300, "150", recipe.distill.seed)
    assert sampled[0]["history"]["grad_noise"] == pytest.approx(norms[rows].mean().item(), rel=1e-6)
    # within 4 standard errors of the full mean (a sample of 150 of 300 without replacement)
    error = norms.std().item() / 150 ** 0.5 * ((300 - 150) / 299) ** 0.5
    assert abs(sampled[0]["history"]["grad_noise"] - whole["history"]["grad_noise"]) < 4 * error
    other_seed, _ = student(tmp_path, teacher, "seed1", grad_noise_examples=150, seed=1)
    assert other_seed["history"]["grad_noise"] != sampled[0]["history"]["grad_noise"]


def test_zero_is_off_and_reports_say_the_size(tmp_path, teacher):
    path = distill.run(build_recipe({**BASE, "out": str(tmp_path / "off"),
                                     "distill": {**BASE["distill"], "targets": "true", "grad_noise_examples": 0}}), None)
    history = torch.load(path, weights_only=True)["history"]
    assert history["grad_noise"] is None and history["grad_noise_examples"] == 0
    off = evaluate.evaluate_one(path, {"device": "cpu", "evaluate": {"grad_targets": ["onehot"],
                                                                     "grad_noise_examples": 0}})["metrics"]
    assert off["grad_noise"] is None and off["grad_noise_examples"] == 0
    assert off["grad_noise_onehot"] is None and off["grad_targets_examples"] == 0
    report = evaluate.evaluate_one(path, {"device": "cpu", "evaluate": {"grad_targets": ["onehot", "true"],
                                                                        "grad_noise_examples": 120}})
    measured = report["metrics"]
    assert measured["grad_targets_examples"] == 120 and report["evaluate"]["grad_noise_examples"] == "120"
    assert measured["grad_noise_onehot"] > measured["grad_noise_true"] > 0
    everything = evaluate.evaluate_one(path, {"device": "cpu", "evaluate": {"grad_targets": ["true"],
                                                                            "grad_noise_examples": "all"}})
    assert everything["metrics"]["grad_targets_examples"] == 300


def test_the_setting_is_checked():
    assert build_recipe({"distill": {"grad_noise_examples": 512}}).distill.grad_noise_examples == "512"
    assert build_recipe({}).distill.grad_noise_examples == "2048"
    with pytest.raises(BcpkdError, match="distill.grad_noise_examples: 'some'.*evaluate.grad_noise_examples: '-1'"):
        build_recipe({"distill": {"grad_noise_examples": "some"}, "evaluate": {"grad_noise_examples": -1}})


def test_evaluate_measures_other_targets_on_the_students_own_sample(tmp_path, teacher):
    """A student of seed 3 that learned the true BCPs by pure KD: `evaluate --grad-targets true` with the same K
    draws the rows its own grad_noise was measured on (its distill.seed, not evaluate's default), so the two agree."""
    payload, _ = student(tmp_path, teacher, "s3", targets="true", alpha=1.0, seed=3, grad_noise_examples=150)
    report = evaluate.evaluate_one(tmp_path / "s3" / "student.pt",
                                   {"device": "cpu", "evaluate": {"grad_targets": ["true"],
                                                                  "grad_noise_examples": 150}})["metrics"]
    assert report["grad_noise_true"] == pytest.approx(payload["history"]["grad_noise"], rel=1e-6)
