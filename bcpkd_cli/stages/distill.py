"""distill: train a student on the teacher's cached BCPs (or on one-hot, true or noisy BCP targets)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.calibration import cache_expectations, ensure_cache
from bcpkd_cli.config import Recipe, Targets, to_plain
from bcpkd_cli.data import Dataset, load_dataset
from bcpkd_cli.engine import TrainSpec, console, per_example_grad_sq_norms, predict_logits, resolve_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec


def teacher_targets(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                    device: torch.device) -> tuple[torch.Tensor, dict]:
    """The teacher's cached BCPs [N, C] at T_t (found, given, or built now) and their provenance."""
    t_teacher = recipe.distill.t_teacher
    if teacher_path is None:
        raise BcpkdError("distill --targets teacher needs --teacher TEACHER.pt "
                         "(or choose --targets onehot|true|noisy)")
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
    if payload["data"]["fingerprint"] != data.fingerprint:
        console.print(f"[yellow]warning:[/] {teacher_path} was trained on data {payload['data']['fingerprint']}, "
                      f"the student trains on {data.fingerprint}")
    if cache is None:
        cache, built = ensure_cache(teacher_path, payload, data, recipe.calibrate, t_teacher, device,
                                    n_bins=recipe.evaluate.ece_bins)
        console.print(f"{'built' if built else 'using'} BCP cache {cache}")
    probs, _ = artifacts.load_cache(cache, cache_expectations(teacher_path, data, t_teacher))
    info = {"teacher_sha256": artifacts.sha256_file(teacher_path), "cache": str(Path(cache).resolve()),
            "cache_sha256": artifacts.sha256_file(cache)}
    return probs[:, 0, :].float(), info  # V = 1 view


def training_targets(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                     device: torch.device) -> tuple[torch.Tensor, dict]:
    """Target probabilities [N, C] for the training split at T_t, and their provenance."""
    cfg, train_split = recipe.distill, data.train
    if cfg.targets == Targets.teacher:
        return teacher_targets(recipe, data, teacher_path, cache, device)
    if cfg.targets == Targets.onehot:
        return targets.onehot(train_split.labels, data.n_classes), {}
    if train_split.true_bcp is None:
        raise BcpkdError(f"--targets {cfg.targets.value}: dataset {recipe.data.name.value} has no true BCPs; "
                         f"use --targets teacher or onehot")
    if cfg.targets == Targets.true:
        return targets.temper(train_split.true_bcp, cfg.t_teacher), {}
    noisy = targets.dirichlet_noised(train_split.true_bcp.cpu(), cfg.dirichlet_alpha, cfg.seed).to(device)
    return targets.temper(noisy, cfg.t_teacher), {"dirichlet_alpha": cfg.dirichlet_alpha}


def run(recipe: Recipe, teacher_path: Path | None, cache: Path | None = None) -> Path:
    cfg = recipe.distill
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data).to(device)
    teacher_path = Path(teacher_path) if teacher_path else None
    target_probs, provenance = training_targets(recipe, data, teacher_path, cache, device)
    out = artifacts.new_run_dir(recipe.out, f"student-{cfg.targets.value}")

    spec = model_spec(cfg.arch.value, data.input_shape, data.n_classes, cfg.hidden)
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    target_probs = target_probs.to(device)
    train_split, held = data.train, data.heldout

    def loss_fn(logits, labels, teacher_probs):
        return kd_loss(logits, labels, teacher_probs, cfg.alpha, cfg.t_teacher, cfg.t_student)

    log: list[dict] = []

    def log_heldout(step: int, net) -> None:
        held_probs = torch.softmax(predict_logits(net, held.inputs), dim=1)
        log.append({"step": step, "heldout_nll": metrics.nll(held_probs, held.labels),
                    "heldout_accuracy": metrics.accuracy(held_probs, held.labels)})

    train_spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                           cfg.seed)
    started = time.perf_counter()
    steps = train(model, train_split.inputs, train_split.labels, target_probs, loss_fn, train_spec,
                  desc=f"student ({cfg.targets.value})", log_every=cfg.log_every, log_fn=log_heldout)
    seconds = time.perf_counter() - started
    grad_noise = per_example_grad_sq_norms(model, train_split.inputs, train_split.labels, target_probs,
                                           loss_fn).mean().item()

    artifacts.write_text(out / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in log))
    payload = {
        "format": artifacts.STUDENT_FORMAT, "version": artifacts.VERSION, "model": spec,
        "state_dict": model.state_dict(), "config": to_plain(recipe),
        "data": {"fingerprint": data.fingerprint, "config": to_plain(recipe.data)},
        "targets": {"kind": cfg.targets.value, **provenance}, "log": log,
        "history": {"steps": steps, "seconds": round(seconds, 2), "grad_noise": grad_noise},
    }
    path = artifacts.save_checkpoint(out / "student.pt", payload)
    artifacts.write_config(out, recipe)
    console.print(f"student ({cfg.targets.value}): {steps} steps in {seconds:.1f}s, final held-out "
                  f"accuracy {log[-1]['heldout_accuracy']:.4f}, gradient noise {grad_noise:.3g}")
    return path
