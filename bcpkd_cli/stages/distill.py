"""distill: train a student on the teacher's cached BCPs (or on one-hot, true or noisy BCP targets)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.calibration import cache_expectations, cache_view_ids, ensure_cache
from bcpkd_cli.config import Recipe, Targets, to_plain
from bcpkd_cli.data import Dataset, few_shot_rows, load_dataset, views
from bcpkd_cli.engine import TrainSpec, console, per_example_grad_sq_norms, predict_logits, resolve_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.teachers import Teacher, load_teacher


def _teacher_cache(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                   device: torch.device) -> tuple[Path, dict]:
    """The BCP cache for this teacher (found, given, or built now) and the teacher's provenance."""
    if teacher_path is None:
        raise BcpkdError(f"distill --targets {recipe.distill.targets.value} needs --teacher TEACHER.pt "
                         f"(or choose --targets onehot|true|noisy)")
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
    if payload["data"]["fingerprint"] != data.fingerprint:
        console.print(f"[yellow]warning:[/] {teacher_path} was trained on data {payload['data']['fingerprint']}, "
                      f"the student trains on {data.fingerprint}")
    if cache is None:
        cache, built = ensure_cache(teacher_path, payload, data, recipe.calibrate, recipe.distill.t_teacher, device,
                                    n_bins=recipe.evaluate.ece_bins)
        console.print(f"{'built' if built else 'using'} BCP cache {cache}")
    info = {"teacher_sha256": artifacts.sha256_file(teacher_path), "cache": str(Path(cache).resolve()),
            "cache_sha256": artifacts.sha256_file(cache)}
    return Path(cache), info


def training_targets(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                     device: torch.device) -> tuple[torch.Tensor | Teacher, dict]:
    """Target probabilities [N, V, C] at T_t for the training split (V = 1 unless cached per view; a cache
    stays memory-mapped on the CPU, in its stored dtype), or for --targets online the calibrated teacher
    itself; and their provenance."""
    cfg, train_split = recipe.distill, data.train
    if cfg.targets in (Targets.teacher, Targets.online):
        cache, info = _teacher_cache(recipe, data, teacher_path, cache, device)
        if cfg.targets == Targets.online:  # the calibrated teacher that made the cache, run on every batch
            calibrated = artifacts.load_checkpoint(cache.parent / "teacher.pt", artifacts.TEACHER_FORMAT)
            return load_teacher(calibrated, device), info
        expect = cache_expectations(teacher_path, data, cfg.t_teacher, recipe.calibrate)
        probs, _ = artifacts.load_cache(cache, expect)  # memory-mapped; on CUDA copied to the device once
        return (probs if device.type == "cpu" else probs.to(device)), info
    if cfg.targets == Targets.onehot:
        return targets.onehot(train_split.labels, data.n_classes)[:, None, :], {}
    if train_split.true_bcp is None:
        raise BcpkdError(f"--targets {cfg.targets.value}: dataset {recipe.data.name.value} has no true BCPs; "
                         f"use --targets teacher or onehot")
    if cfg.targets == Targets.true:
        return targets.temper(train_split.true_bcp, cfg.t_teacher)[:, None, :], {}
    noisy = targets.dirichlet_noised(train_split.true_bcp.cpu(), cfg.dirichlet_alpha, cfg.seed).to(device)
    return targets.temper(noisy, cfg.t_teacher)[:, None, :], {"dirichlet_alpha": cfg.dirichlet_alpha}


def view_batches(recipe: Recipe, data: Dataset, targets_or_teacher: torch.Tensor | Teacher, device: torch.device,
                 example_index: torch.Tensor):
    """batch_fn(rows, epoch): each example's view of the epoch and its exact target (design.md sec. 2).
    `example_index` [N] maps rows to the training split's example ids (they seed MC draws)."""
    view_ids = cache_view_ids(data, recipe.calibrate).to(device)  # [V]
    sampler = views.ViewSampler(len(data.train), len(view_ids), recipe.distill.seed)
    train_inputs, t_teacher = data.train.inputs, recipe.distill.t_teacher

    def batch(rows: torch.Tensor, epoch: int):
        slots = sampler.slots(rows, epoch)  # [B] columns of the [N, V, C] cache
        ids = view_ids[slots]
        inputs = views.apply_views(train_inputs[rows], ids) if data.is_image else train_inputs[rows]
        if isinstance(targets_or_teacher, torch.Tensor):
            per_view = targets_or_teacher.shape[1] > 1
            return inputs, targets_or_teacher[rows, slots if per_view else 0].float()  # a float16 cache too
        return inputs, targets_or_teacher.predict_probs(inputs, views.sample_index(example_index[rows.cpu()], ids),
                                                        t_teacher)

    return batch


def view_zero_targets(targets_or_teacher: torch.Tensor | Teacher, data: Dataset, t_teacher: float,
                      example_index: torch.Tensor) -> torch.Tensor:
    """Targets [N, C] of every unaugmented training example (view 0), for the gradient noise."""
    if isinstance(targets_or_teacher, torch.Tensor):
        return targets_or_teacher[:, 0].float()
    return targets_or_teacher.predict_probs(data.train.inputs, views.sample_index(example_index, 0 * example_index),
                                            t_teacher)


def run(recipe: Recipe, teacher_path: Path | None, cache: Path | None = None) -> Path:
    cfg = recipe.distill
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data).to(device)
    teacher_path = Path(teacher_path) if teacher_path else None
    targets_or_teacher, provenance = training_targets(recipe, data, teacher_path, cache, device)
    example_index = torch.arange(len(data.train))
    if cfg.few_shot:  # the student sees K examples per class; the teacher's cache covers them all
        example_index = few_shot_rows(data.train.labels, cfg.few_shot, cfg.seed)
        data = replace(data, train=data.train.subset(example_index))
        if isinstance(targets_or_teacher, torch.Tensor):
            targets_or_teacher = targets_or_teacher[example_index.to(targets_or_teacher.device)]
        provenance["few_shot_rows"] = example_index.tolist()
    out = artifacts.new_run_dir(recipe.out, f"student-{cfg.targets.value}")

    spec = model_spec(cfg.arch.value, data.input_shape, data.n_classes, cfg.hidden)
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    train_split, held = data.train, data.heldout

    def loss_fn(logits, labels, teacher_probs):
        return kd_loss(logits, labels, teacher_probs, cfg.alpha, cfg.t_teacher, cfg.t_student)

    log: list[dict] = []

    def log_heldout(step: int, net) -> None:
        held_probs = torch.softmax(predict_logits(net, held.inputs), dim=1)
        log.append({"step": step, "heldout_nll": metrics.nll(held_probs, held.labels),
                    "heldout_accuracy": metrics.accuracy(held_probs, held.labels)})

    train_spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                           cfg.seed, cfg.lr_milestones)
    started = time.perf_counter()
    steps = train(model, train_split.inputs, train_split.labels, None, loss_fn, train_spec,
                  desc=f"student ({cfg.targets.value})", log_every=cfg.log_every, log_fn=log_heldout,
                  batch_fn=view_batches(recipe, data, targets_or_teacher, device, example_index))
    seconds = time.perf_counter() - started
    grad_noise = per_example_grad_sq_norms(model, train_split.inputs, train_split.labels,
                                           view_zero_targets(targets_or_teacher, data, cfg.t_teacher, example_index),
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
