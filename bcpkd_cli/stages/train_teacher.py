"""train-teacher: train a network with cross-entropy (or take a trained one), fit its posterior, save."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from bcpkd_cli import artifacts, metrics
from bcpkd_cli.config import Bayes, Recipe, to_plain
from bcpkd_cli.data import load_dataset
from bcpkd_cli.engine import TrainSpec, console, resolve_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model
from bcpkd_cli.teachers import teacher_payload
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher


def cross_entropy(logits, labels, _targets):
    return F.cross_entropy(logits, labels, reduction="none")


def _base_network(path: str, data_fingerprint: str, device: torch.device):
    """The network of an existing deterministic teacher, its spec and SHA-256."""
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    if payload["bayes"] != Bayes.none.value:
        raise BcpkdError(f"teacher.base {path}: is a {payload['bayes']} teacher; give a deterministic "
                         f"(--bayes none) teacher.pt to fit a posterior around")
    if payload["data"]["fingerprint"] != data_fingerprint:
        console.print(f"[yellow]warning:[/] {path} was trained on other data "
                      f"({payload['data']['fingerprint']}); fitting the posterior on {data_fingerprint}")
    model = build_model(payload["model"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device), payload["model"], artifacts.sha256_file(Path(path)), payload["history"]


def run(recipe: Recipe) -> Path:
    cfg = recipe.teacher
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data)
    out = artifacts.new_run_dir(recipe.out, f"teacher-{cfg.bayes.value}")
    train_x, train_y = data.train.inputs.to(device), data.train.labels.to(device)

    if cfg.base:
        model, model_spec, parent_sha, history = _base_network(cfg.base, data.fingerprint, device)
    else:
        model_spec = {"arch": cfg.arch.value, "input_shape": list(data.input_shape),
                      "n_classes": data.n_classes, "hidden": list(cfg.hidden)}
        torch.manual_seed(cfg.seed)
        model = build_model(model_spec).to(device)
        spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.seed)
        started = time.perf_counter()
        steps = train(model, train_x, train_y, None, cross_entropy, spec, desc="teacher")
        history = {"steps": steps, "seconds": round(time.perf_counter() - started, 2)}
        parent_sha = None

    if cfg.bayes == Bayes.laplace:
        teacher = LaplaceTeacher(model, cfg.laplace, noise_seed=cfg.seed)
        teacher.fit(train_x, train_y)
        teacher.tune_prior(cfg.laplace.prior, data.heldout.inputs.to(device), data.heldout.labels.to(device))
        history["prior_precision"] = teacher.prior_precision
    else:
        teacher = DeterministicTeacher(model)

    held = data.heldout
    held_probs = teacher.predict_probs(held.inputs.to(device), torch.arange(len(held))).cpu()
    history["heldout"] = metrics.classification_report(held_probs, held.labels, held.true_bcp)
    data_info = {"fingerprint": data.fingerprint, "config": to_plain(recipe.data)}
    payload = teacher_payload(teacher, cfg.bayes, model_spec, to_plain(recipe), data_info, parent_sha, history)
    path = artifacts.save_checkpoint(out / "teacher.pt", payload)
    artifacts.write_text(out / "config.yaml", yaml.safe_dump(to_plain(recipe), sort_keys=False))
    summary = ", ".join(f"{k} {v:.4f}" for k, v in history["heldout"].items())
    console.print(f"{cfg.bayes.value} teacher: held-out {summary}")
    return path
