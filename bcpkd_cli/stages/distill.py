"""distill: train a student on the teacher's cached BCPs (or on one-hot, true or noisy BCP targets)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.calibration import ensure_cache
from bcpkd_cli.config import DistillConfig, Recipe, Targets, to_plain
from bcpkd_cli.data import Dataset, load_dataset
from bcpkd_cli.engine import TrainSpec, console, per_example_grad_sq_norms, predict_logits, resolve_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model


def training_targets(cfg: DistillConfig, recipe: Recipe, data: Dataset, teacher_path: Path | None,
                     device: torch.device) -> tuple[torch.Tensor, dict]:
    """Target probabilities [N, C] for the training split at T_t, and their provenance."""
    train_split = data.train
    if cfg.targets == Targets.teacher:
        if teacher_path is None:
            raise BcpkdError("distill --targets teacher needs --teacher TEACHER.pt "
                             "(or choose --targets onehot|true|noisy)")
        payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
        if payload["data"]["fingerprint"] != data.fingerprint:
            console.print(f"[yellow]warning:[/] {teacher_path} was trained on data {payload['data']['fingerprint']}, "
                          f"the student trains on {data.fingerprint}")
        path, built = ensure_cache(teacher_path, payload, data, recipe.calibrate, cfg.t_teacher, device,
                                   n_bins=recipe.evaluate.ece_bins)
        console.print(f"{'built' if built else 'using'} BCP cache {path}")
        probs, _ = artifacts.load_cache(path, {"data_fingerprint": data.fingerprint, "t_teacher": cfg.t_teacher,
                                               "n_examples": len(train_split)})
        info = {"teacher_sha256": artifacts.sha256_file(teacher_path), "cache": str(path),
                "cache_sha256": artifacts.sha256_file(path)}
        return probs[:, 0, :].float(), info  # V = 1 view
    if cfg.targets == Targets.onehot:
        return targets.onehot(train_split.labels, data.n_classes), {}
    if train_split.true_bcp is None:
        raise BcpkdError(f"--targets {cfg.targets.value}: dataset {recipe.data.name.value} has no true BCPs; "
                         f"use --targets teacher or onehot")
    if cfg.targets == Targets.true:
        return targets.temper(train_split.true_bcp, cfg.t_teacher), {}
    noisy = targets.dirichlet_noised(train_split.true_bcp, cfg.dirichlet_alpha, cfg.seed)
    return targets.temper(noisy, cfg.t_teacher), {"dirichlet_alpha": cfg.dirichlet_alpha}


def run(recipe: Recipe, teacher_path: Path | None) -> Path:
    cfg = recipe.distill
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data)
    teacher_path = Path(teacher_path) if teacher_path else None
    target_probs, provenance = training_targets(cfg, recipe, data, teacher_path, device)
    out = artifacts.new_run_dir(recipe.out, f"student-{cfg.targets.value}")

    model_spec = {"arch": cfg.arch.value, "input_shape": list(data.input_shape), "n_classes": data.n_classes,
                  "hidden": list(cfg.hidden)}
    torch.manual_seed(cfg.seed)
    model = build_model(model_spec).to(device)
    train_x, train_y = data.train.inputs.to(device), data.train.labels.to(device)
    target_probs = target_probs.to(device)
    held_x, held_y = data.heldout.inputs.to(device), data.heldout.labels.to(device)

    def loss_fn(logits, labels, teacher_probs):
        return kd_loss(logits, labels, teacher_probs, cfg.alpha, cfg.t_teacher, cfg.t_student)

    log: list[dict] = []

    def log_heldout(step: int, net) -> None:
        held_probs = torch.softmax(predict_logits(net, held_x), dim=1).cpu()
        log.append({"step": step, "heldout_nll": metrics.nll(held_probs, held_y.cpu()),
                    "heldout_accuracy": metrics.accuracy(held_probs, held_y.cpu())})

    spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.seed)
    started = time.perf_counter()
    steps = train(model, train_x, train_y, target_probs, loss_fn, spec, desc=f"student ({cfg.targets.value})",
                  log_every=cfg.log_every, log_fn=log_heldout)
    seconds = time.perf_counter() - started
    grad_noise = per_example_grad_sq_norms(model, train_x, train_y, target_probs, loss_fn).mean().item()

    artifacts.write_text(out / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in log))
    payload = {
        "format": artifacts.STUDENT_FORMAT, "version": artifacts.VERSION, "model": model_spec,
        "state_dict": model.state_dict(), "config": to_plain(recipe),
        "data": {"fingerprint": data.fingerprint, "config": to_plain(recipe.data)},
        "targets": {"kind": cfg.targets.value, **provenance}, "log": log,
        "history": {"steps": steps, "seconds": round(seconds, 2), "grad_noise": grad_noise},
    }
    path = artifacts.save_checkpoint(out / "student.pt", payload)
    artifacts.write_text(out / "config.yaml", yaml.safe_dump(to_plain(recipe), sort_keys=False))
    console.print(f"student ({cfg.targets.value}): {steps} steps in {seconds:.1f}s, final held-out "
                  f"accuracy {log[-1]['heldout_accuracy']:.4f}, gradient noise {grad_noise:.3g}")
    return path
