"""train-teacher: train a network the way the teacher kind asks (or take a trained one), fit its posterior, save.

Kinds: none (cross-entropy), temperature (+ a temperature fitted on held-out NLL), mse (mean squared
error to the one-hot labels), mcmi (cross-entropy, then fine-tuned with a CMI term), laplace
(+ a Laplace posterior), mc-dropout (trained with dropout), vi (bayesian-torch variational layers,
KL weight annealed), ensemble (M seeds, or M existing checkpoints).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli import artifacts, losses, metrics
from bcpkd_cli.calibration import fit_temperature
from bcpkd_cli.config import Arch, Bayes, Recipe, TeacherConfig, to_plain
from bcpkd_cli.data import Dataset, load_dataset, views
from bcpkd_cli.engine import (Resume, TrainSpec, broadcast_buffers, console, join_process_group, predict_logits,
                              prepare_for_device, resolve_device, train)
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.resumption import TEACHER_SECTIONS, finish, require_saved_state, resumable, settings_of
from bcpkd_cli.teachers import Teacher, teacher_payload
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.ensemble import EnsembleTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher, check_hessian_size
from bcpkd_cli.teachers.mc_dropout import MCDropoutTeacher
from bcpkd_cli.teachers.vi import VITeacher, kl_divergence, kl_weight, to_bayesian

SINGLE_NETWORK = (Bayes.none, Bayes.mse, Bayes.mcmi)  # kinds an ensemble can be assembled from


def cross_entropy(logits, labels, _targets):
    return F.cross_entropy(logits, labels, reduction="none")


def mean_squared_error(logits, labels, _targets):
    return losses.mse_to_onehot(logits, labels)


def random_views(data: Dataset, seed: int):
    """Batches of a random pad-4 crop x flip view (of all 162) of every image, drawn anew every epoch."""
    sampler = views.ViewSampler(len(data.train), views.N_VIEWS, seed)

    def batch(rows: torch.Tensor, epoch: int):
        return views.apply_views(data.train.inputs[rows], sampler.slots(rows, epoch)), None

    return batch


def plain_or_views(data: Dataset, cfg: TeacherConfig, seed: int):
    return random_views(data, seed) if data.is_image and cfg.augment else None


def _load_deterministic(path: str, option: str, data_fingerprint: str, kinds: tuple[Bayes, ...]) -> dict:
    """The checkpoint of an existing single-network teacher (a base, or an ensemble member)."""
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    if Bayes(payload["bayes"]) not in kinds:
        raise BcpkdError(f"{option} {path}: is a {payload['bayes']} teacher; give a teacher.pt of kind "
                         f"{' or '.join(k.value for k in kinds)}")
    if payload["data"]["fingerprint"] != data_fingerprint:
        console.print(f"[yellow]warning:[/] {path} was trained on other data "
                      f"({payload['data']['fingerprint']}); using it on {data_fingerprint}")
    return payload


def _train_network(model: nn.Module, data: Dataset, recipe: Recipe, loss_fn, seed: int, desc: str, resume: Resume,
                   epochs: int | None = None, lr: float | None = None, batch_fn=None, penalty=None) -> dict:
    cfg = recipe.teacher
    spec = TrainSpec(epochs or cfg.epochs, cfg.batch_size, cfg.optimizer, lr or cfg.lr, cfg.momentum,
                     cfg.weight_decay, seed, cfg.lr_milestones, recipe.precision, recipe.compile)
    started = time.perf_counter()
    steps = train(model, data.train.inputs, data.train.labels, None, loss_fn, spec, desc=desc,
                  batch_fn=batch_fn or plain_or_views(data, cfg, seed), penalty=penalty, resume=resume)
    return {"steps": steps, "seconds": round(time.perf_counter() - started, 2)}


def class_centroids(model: nn.Module, data: Dataset) -> torch.Tensor:
    """Q [C, C]: row y is the mean predictive of the training examples labelled y (eval mode)."""
    probs = torch.softmax(predict_logits(model, data.train.inputs, 1024), dim=1)
    sums = torch.zeros(data.n_classes, data.n_classes, device=probs.device).index_add_(0, data.train.labels, probs)
    counts = torch.bincount(data.train.labels, minlength=data.n_classes).clamp_min(1)
    return sums / counts[:, None]


def fine_tune_mcmi(model: nn.Module, data: Dataset, recipe: Recipe, resume: Resume) -> dict:
    """Minimise CE - lambda * KL(p(x) || Q_y) with the class centroids Q recomputed every epoch."""
    cfg = recipe.teacher
    views_batch = plain_or_views(data, cfg, cfg.seed + 1)
    state: dict = {"epoch": None, "centroids": None}

    def batch(rows: torch.Tensor, epoch: int):
        if state["epoch"] != epoch:
            broadcast_buffers(model)  # under torchrun: every process uses rank 0's BatchNorm statistics
            state["epoch"], state["centroids"] = epoch, class_centroids(model, data)
            model.train()
        inputs = views_batch(rows, epoch)[0] if views_batch else data.train.inputs[rows]
        return inputs, state["centroids"][data.train.labels[rows]]

    def loss_fn(logits, labels, centroid_probs):
        cmi = losses.cmi_to_centroids(logits, centroid_probs)
        return F.cross_entropy(logits, labels, reduction="none") - cfg.mcmi.weight * cmi

    return _train_network(model, data, recipe, loss_fn, cfg.seed + 1, "mcmi fine-tuning", resume,
                          epochs=cfg.mcmi.epochs, lr=cfg.lr * cfg.mcmi.lr_scale, batch_fn=batch)


def train_vi(model: nn.Module, data: Dataset, recipe: Recipe, resume: Resume) -> dict:
    """Cross-entropy + beta(epoch) * KL(q || p) / N: beta is 0 for vi.ml_epochs, then rises linearly to 1."""
    cfg, n_train = recipe.teacher, len(data.train)

    def penalty(epoch: int):
        weight = kl_weight(epoch, cfg.vi)
        return weight * kl_divergence(model) / n_train if weight else 0.0  # no KL work in the ML epochs

    return _train_network(model, data, recipe, cross_entropy, cfg.seed, "vi teacher", resume, penalty=penalty)


def train_ensemble(spec: dict, data: Dataset, recipe: Recipe, device: torch.device,
                   phase: Callable[[str], Resume]) -> tuple[list, dict]:
    cfg = recipe.teacher
    members, seconds = [], []
    for m in range(cfg.ensemble.members):
        torch.manual_seed(cfg.seed + m)
        member = prepare_for_device(build_model(spec), device, recipe.precision)
        seconds.append(_train_network(member, data, recipe, cross_entropy, cfg.seed + m,
                                      f"ensemble member {m + 1}/{cfg.ensemble.members}",
                                      phase(f"member{m + 1}"))["seconds"])
        members.append(member)
    return members, {"seconds": round(sum(seconds), 2), "member_seconds": seconds}


def _assemble(cfg: TeacherConfig, data_fingerprint: str) -> tuple[list[dict], dict]:
    """The payloads of existing teachers named by teacher.ensemble.checkpoints; all of one architecture."""
    payloads = [_load_deterministic(p, "teacher.ensemble.checkpoints:", data_fingerprint, SINGLE_NETWORK)
                for p in cfg.ensemble.checkpoints]
    for path, payload in zip(cfg.ensemble.checkpoints, payloads):
        if payload["predictive"]["calibration_temperature"] != 1.0:
            console.print(f"[yellow]warning:[/] {path} carries a calibration temperature; the ensemble averages "
                          f"its network's softmax at T = 1 (calibrate the ensemble instead)")
        if payload["model"] != payloads[0]["model"]:
            raise BcpkdError(f"teacher.ensemble.checkpoints: {path} is a {payload['model']['arch']} network unlike "
                             f"{cfg.ensemble.checkpoints[0]} ({payloads[0]['model']['arch']}); members must share "
                             f"one architecture")
    return payloads, {"members_sha256": [artifacts.sha256_file(Path(p)) for p in cfg.ensemble.checkpoints]}


def run(recipe: Recipe, resume: bool = False) -> Path | None:
    """Train (or assemble) the teacher; `resume` continues an interrupted run in recipe.out from the last
    epoch end of its unfinished training phase. Under torchrun the processes share every batch (DDP)
    and rank 0 writes the teacher (the others return None)."""
    cfg = recipe.teacher
    device = resolve_device(recipe.device)
    place = join_process_group(device)
    data = load_dataset(recipe.data)
    kind = cfg.bayes
    members = _assemble(cfg, data.fingerprint) if kind == Bayes.ensemble and cfg.ensemble.checkpoints else None
    base = _load_deterministic(cfg.base, "teacher.base", data.fingerprint, (Bayes.none,)) if cfg.base else None
    if base is not None or members is not None:  # the stored config describes the network actually used
        used = base["model"] if base is not None else members[0][0]["model"]
        cfg = replace(cfg, arch=Arch(used["arch"]), hidden=tuple(used["hidden"]))
        recipe = replace(recipe, teacher=cfg)
    spec = members[0][0]["model"] if members is not None else model_spec(
        cfg.arch.value, data.input_shape, data.n_classes, cfg.hidden,
        dropout=cfg.mc_dropout.rate if kind == Bayes.mc_dropout else 0.0)
    torch.manual_seed(cfg.seed)
    model = prepare_for_device(build_model(spec, base["state_dict"] if base else None), device, recipe.precision)
    if kind == Bayes.laplace:
        check_hessian_size(model, cfg.laplace)  # before spending any time on training
    out = artifacts.new_run_dir(recipe.out, f"teacher-{kind.value}")
    if resume:
        require_saved_state(out)
    parent_sha = artifacts.sha256_file(Path(cfg.base)) if base is not None else None
    settings = {**settings_of(recipe, TEACHER_SECTIONS), "data_fingerprint": data.fingerprint,
                "base_sha256": parent_sha, "processes": place.size}

    def phase(name: str) -> Resume:  # one state file per training phase (main, ensemble member, fine-tuning)
        return resumable(out / f"train-state-{name}.pt", settings, resume)

    data = data.to(device)
    history: dict = dict(base["history"]) if base is not None else {}

    teacher: Teacher
    if kind == Bayes.ensemble:
        if members is not None:
            payloads, history = members
            networks = [build_model(p["model"], p["state_dict"]).to(device) for p in payloads]
        else:
            networks, history = train_ensemble(spec, data, recipe, device, phase)
        teacher = EnsembleTeacher(networks)
    elif kind == Bayes.vi:
        model = prepare_for_device(to_bayesian(model, cfg.vi, from_base=base is not None), device, recipe.precision)
        history = train_vi(model, data, recipe, phase("vi"))
        teacher = VITeacher(model, spec, cfg.vi.samples, noise_seed=cfg.seed)
    else:
        if base is None:
            loss_fn = mean_squared_error if kind == Bayes.mse else cross_entropy
            history = _train_network(model, data, recipe, loss_fn, cfg.seed, f"{kind.value} teacher",
                                     phase("teacher"))
        if kind == Bayes.mcmi:
            history["mcmi"] = fine_tune_mcmi(model, data, recipe, phase("mcmi"))
        if kind == Bayes.laplace:
            teacher = LaplaceTeacher(model, cfg.laplace, noise_seed=cfg.seed)
            teacher.fit(data.train.inputs, data.train.labels)
            teacher.tune_prior(cfg.laplace.prior, data.heldout.inputs, data.heldout.labels)
            history["prior_precision"] = teacher.prior_precision
        elif kind == Bayes.mc_dropout:
            teacher = MCDropoutTeacher(model, cfg.mc_dropout.samples, noise_seed=cfg.seed)
        else:
            teacher = DeterministicTeacher(model.eval())
        if kind == Bayes.temperature:
            held = data.heldout
            teacher.calibration_temperature = fit_temperature(
                teacher.predictive_at(held.inputs, torch.arange(len(held))), held.labels)
            history["temperature"] = teacher.calibration_temperature

    held = data.heldout
    held_probs = teacher.predict_probs(held.inputs, torch.arange(len(held)))
    history["heldout"] = metrics.classification_report(held_probs, held.labels, held.true_bcp)
    data_info = {"fingerprint": data.fingerprint, "config": to_plain(recipe.data)}
    if not place.is_main:
        return None
    history["processes"] = place.size
    payload = teacher_payload(teacher, kind, spec, to_plain(recipe), data_info, parent_sha, history)
    path = artifacts.save_checkpoint(out / "teacher.pt", payload)
    artifacts.write_config(out, recipe)
    finish(out)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in history["heldout"].items())
    console.print(f"{kind.value} teacher: held-out {summary}")
    return path
