"""train-teacher: train a network with cross-entropy (or take a trained one), fit its posterior, save."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bcpkd_cli import artifacts, metrics
from bcpkd_cli.config import Arch, Bayes, Recipe, to_plain
from bcpkd_cli.data import load_dataset, views
from bcpkd_cli.engine import TrainSpec, console, resolve_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.teachers import teacher_payload
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher, check_hessian_size


def cross_entropy(logits, labels, _targets):
    return F.cross_entropy(logits, labels, reduction="none")


def random_views(data, seed: int):
    """Batches of a random pad-4 crop x flip view (of all 162) of every image, drawn anew every epoch."""
    sampler = views.ViewSampler(len(data.train), views.N_VIEWS, seed)

    def batch(rows: torch.Tensor, epoch: int):
        return views.apply_views(data.train.inputs[rows], sampler.slots(rows, epoch)), None

    return batch


def _base_teacher(path: str, data_fingerprint: str) -> dict:
    """The checkpoint of an existing deterministic teacher to fit a posterior around."""
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    if payload["bayes"] != Bayes.none.value:
        raise BcpkdError(f"teacher.base {path}: is a {payload['bayes']} teacher; give a deterministic "
                         f"(--bayes none) teacher.pt to fit a posterior around")
    if payload["data"]["fingerprint"] != data_fingerprint:
        console.print(f"[yellow]warning:[/] {path} was trained on other data "
                      f"({payload['data']['fingerprint']}); fitting the posterior on {data_fingerprint}")
    return payload


def run(recipe: Recipe) -> Path:
    cfg = recipe.teacher
    device = resolve_device(recipe.device)
    data = load_dataset(recipe.data)
    base = _base_teacher(cfg.base, data.fingerprint) if cfg.base else None
    if base is not None:  # the stored config describes the network actually used
        cfg = replace(cfg, arch=Arch(base["model"]["arch"]), hidden=tuple(base["model"]["hidden"]))
        recipe = replace(recipe, teacher=cfg)
    spec = model_spec(cfg.arch.value, data.input_shape, data.n_classes, cfg.hidden)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, base["state_dict"] if base else None).to(device)
    if cfg.bayes == Bayes.laplace:
        check_hessian_size(model, cfg.laplace)  # before spending any time on training
    out = artifacts.new_run_dir(recipe.out, f"teacher-{cfg.bayes.value}")
    data = data.to(device)

    if base is not None:
        history = dict(base["history"])
        parent_sha = artifacts.sha256_file(Path(cfg.base))
    else:
        train_spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum,
                               cfg.weight_decay, cfg.seed, cfg.lr_milestones)
        started = time.perf_counter()
        steps = train(model, data.train.inputs, data.train.labels, None, cross_entropy, train_spec, desc="teacher",
                      batch_fn=random_views(data, cfg.seed) if data.is_image and cfg.augment else None)
        history = {"steps": steps, "seconds": round(time.perf_counter() - started, 2)}
        parent_sha = None

    if cfg.bayes == Bayes.laplace:
        teacher = LaplaceTeacher(model, cfg.laplace, noise_seed=cfg.seed)
        teacher.fit(data.train.inputs, data.train.labels)
        teacher.tune_prior(cfg.laplace.prior, data.heldout.inputs, data.heldout.labels)
        history["prior_precision"] = teacher.prior_precision
    else:
        teacher = DeterministicTeacher(model)

    held = data.heldout
    held_probs = teacher.predict_probs(held.inputs, torch.arange(len(held)))
    history["heldout"] = metrics.classification_report(held_probs, held.labels, held.true_bcp)
    data_info = {"fingerprint": data.fingerprint, "config": to_plain(recipe.data)}
    payload = teacher_payload(teacher, cfg.bayes, spec, to_plain(recipe), data_info, parent_sha, history)
    path = artifacts.save_checkpoint(out / "teacher.pt", payload)
    artifacts.write_config(out, recipe)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in history["heldout"].items())
    console.print(f"{cfg.bayes.value} teacher: held-out {summary}")
    return path
