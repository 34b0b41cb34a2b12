"""evaluate: accuracy, NLL, ECE, Brier, distance to the true BCPs, convergence and gradient noise."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.config import Recipe, recipe_for_checkpoint
from bcpkd_cli.data import Dataset, load_dataset
from bcpkd_cli.engine import console, per_example_grad_sq_norms, predict_logits, resolve_device
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model
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
        target_probs = targets.dirichlet_noised(train.true_bcp, float(which.split(":")[1]), seed)
    norms = per_example_grad_sq_norms(model, train.inputs.to(device), train.labels.to(device),
                                      target_probs.to(device), pure_kd)
    return norms.mean().item()


def evaluate_student(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> dict:
    model = build_model(payload["model"])
    model.load_state_dict(payload["state_dict"])
    model.to(device)
    test = data.test
    probs = torch.softmax(predict_logits(model, test.inputs.to(device), recipe.evaluate.batch_size), dim=1).cpu()
    report = metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins)
    log = payload["log"]
    report["convergence_noise_nll"] = metrics.convergence_noise([e["heldout_nll"] for e in log])
    report["convergence_noise_accuracy"] = metrics.convergence_noise([e["heldout_accuracy"] for e in log])
    report["grad_noise"] = payload["history"]["grad_noise"]
    for which in recipe.evaluate.grad_targets:
        report[f"grad_noise_{which}"] = grad_noise_against(model, data, which, recipe.distill.seed, device)
    return report


def evaluate_teacher(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> dict:
    teacher = load_teacher(payload, device)
    test = data.test
    probs = teacher.predict_probs(test.inputs.to(device), torch.arange(len(test))).cpu()
    return metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins)


def evaluate_one(path: Path, tree: dict) -> dict:
    payload = artifacts.load_checkpoint(path, CHECKPOINT_FORMATS)
    recipe = recipe_for_checkpoint(tree, payload)
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data)
    is_student = payload["format"] == artifacts.STUDENT_FORMAT
    measure = evaluate_student if is_student else evaluate_teacher
    return {"checkpoint": str(path), "kind": "student" if is_student else "teacher",
            **measure(payload, recipe, data, device)}


def print_table(reports: list[dict]) -> None:
    keys = [k for k in reports[0] if k not in ("checkpoint", "kind")]
    for r in reports[1:]:
        keys += [k for k in r if k not in keys and k not in ("checkpoint", "kind")]
    table = Table(title="test-split evaluation")
    table.add_column("checkpoint")
    for key in keys:
        table.add_column(key, justify="right")
    for r in reports:
        table.add_row(r["checkpoint"], *(f"{r[k]:.4g}" if k in r else "-" for k in keys))
    console.print(table)


def run(tree: dict, paths: list[Path], out: str) -> tuple[Path, list[dict]]:
    reports = [evaluate_one(Path(p), tree) for p in paths]
    print_table(reports)
    report_path = artifacts.write_json(artifacts.new_run_dir(out, "eval") / "report.json", reports)
    return report_path, reports
