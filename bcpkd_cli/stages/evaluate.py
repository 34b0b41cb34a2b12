"""evaluate: accuracy, NLL, ECE, Brier, distance to the true BCPs, convergence and gradient noise."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.table import Table

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.config import Recipe, recipe_for_checkpoint, to_plain
from bcpkd_cli.data import Dataset, load_dataset
from bcpkd_cli.console import console
from bcpkd_cli.engine import per_example_grad_sq_norms, resolve_device
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, predict_logits
from bcpkd_cli.teachers import load_teacher

CHECKPOINT_FORMATS = (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT)


def pure_kd(logits, labels, target_probs):
    return kd_loss(logits, labels, target_probs, alpha=1.0, t_teacher=1.0, t_student=1.0)


def grad_noise_against(model, data: Dataset, which: str, seed: int, device: torch.device) -> float:
    """Mean squared per-example gradient norm of pure KD at the model's weights against other targets."""
    train = data.train
    if which == "onehot":
        target_probs = targets.onehot(train.labels, data.n_classes)
    elif train.true_bcp is None:
        raise BcpkdError(f"evaluate.grad_targets {which}: this dataset has no true BCPs; use onehot")
    elif which == "true":
        target_probs = train.true_bcp
    else:
        target_probs = targets.dirichlet_noised(train.true_bcp.cpu(), float(which.split(":")[1]), seed)
    norms = per_example_grad_sq_norms(model, train.inputs, train.labels, target_probs.to(device), pure_kd)
    return norms.mean().item()


def evaluate_student(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> dict:
    model = build_model(payload["model"], payload["state_dict"]).to(device)
    test = data.test
    probs = torch.softmax(predict_logits(model, test.inputs, recipe.evaluate.batch_size), dim=1)
    report = metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins)
    for key in ("nll", "accuracy"):
        noise = metrics.convergence_noise([entry[f"heldout_{key}"] for entry in payload["log"]])
        report[f"convergence_noise_{key}"] = None if math.isnan(noise) else noise  # null: log too short
    report["grad_noise"] = payload["history"]["grad_noise"]
    for which in recipe.evaluate.grad_targets:
        report[f"grad_noise_{which}"] = grad_noise_against(model, data, which, recipe.distill.seed, device)
    return report


def evaluate_teacher(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> dict:
    teacher = load_teacher(payload, device)
    test = data.test
    probs = teacher.predict_probs(test.inputs, torch.arange(len(test)))
    return metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins)


def evaluate_one(path: Path, tree: dict) -> dict:
    payload = artifacts.load_checkpoint(path, CHECKPOINT_FORMATS)
    recipe = recipe_for_checkpoint(tree, payload)
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data).to(device)
    is_student = payload["format"] == artifacts.STUDENT_FORMAT
    measure = evaluate_student if is_student else evaluate_teacher
    return {"checkpoint": str(path), "kind": "student" if is_student else "teacher",
            **measure(payload, recipe, data, device), "config": to_plain(recipe)}


def print_table(reports: list[dict]) -> None:
    keys: list[str] = []
    for r in reports:
        keys += [k for k, v in r.items() if k not in keys and isinstance(v, float)]
    table = Table(title="test-split evaluation")
    table.add_column("checkpoint")
    for key in keys:
        table.add_column(key, justify="right")
    for r in reports:
        table.add_row(r["checkpoint"], *(f"{r[k]:.4g}" if r.get(k) is not None else "-" for k in keys))
    console.print(table)


def run(tree: dict, paths: list[Path], out: str) -> tuple[Path, list[dict]]:
    for p in paths:  # every checkpoint is checked before any is evaluated
        artifacts.load_checkpoint(p, CHECKPOINT_FORMATS)
    reports = [evaluate_one(Path(p), tree) for p in paths]
    print_table(reports)
    report_path = artifacts.write_json(artifacts.new_run_dir(out, "eval") / "report.json", reports)
    return report_path, reports
