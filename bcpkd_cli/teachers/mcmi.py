"""The MCMI teacher (kind `mcmi`): cross-entropy training (or teacher.base), then fine-tuned on
CE - lambda * KL(p(x) || Q_y), Q_y the mean predictive of class y (recomputed every epoch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli import losses
from bcpkd_cli.choices import Bayes, Centroids
from bcpkd_cli.data import Dataset
from bcpkd_cli.engine import broadcast_buffers
from bcpkd_cli.models import predict_logits
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.training import TrainingRun


def class_centroids(model: nn.Module, data: Dataset) -> torch.Tensor:
    """Q [C, C]: row y is the mean predictive of the training examples labelled y (eval mode)."""
    probs = torch.softmax(predict_logits(model, data.train.inputs, 1024), dim=1)
    sums = torch.zeros(data.n_classes, data.n_classes, device=probs.device).index_add_(0, data.train.labels, probs)
    counts = torch.bincount(data.train.labels, minlength=data.n_classes).clamp_min(1)
    return sums / counts[:, None]


def fine_tune(model: nn.Module, run: TrainingRun) -> dict:
    """Minimise CE - lambda * KL(p(x) || Q_y) with the class centroids Q recomputed every epoch (or computed once,
    at the start: mcmi.centroids=once)."""
    cfg, data = run.recipe.teacher, run.data
    views_batch = run.augmented(cfg.seed + 1)
    state: dict = {"epoch": None, "centroids": None}
    if cfg.mcmi.centroids == Centroids.once:  # from the network before fine-tuning (a resumed run too)
        broadcast_buffers(model)
        state["centroids"] = class_centroids(model, data)

    def batch(rows: torch.Tensor, epoch: int):
        if cfg.mcmi.centroids == Centroids.epoch and state["epoch"] != epoch:
            broadcast_buffers(model)  # under torchrun: every process uses rank 0's BatchNorm statistics
            state["epoch"], state["centroids"] = epoch, class_centroids(model, data)
            model.train()
        inputs = views_batch(rows, epoch)[0] if views_batch else data.train.inputs[rows]
        return inputs, state["centroids"][data.train.labels[rows]]

    def loss_fn(logits, labels, centroid_probs):
        cmi = losses.cmi_to_centroids(logits, centroid_probs)
        return F.cross_entropy(logits, labels, reduction="none") - cfg.mcmi.weight * cmi

    return run.fit(model, loss_fn, "mcmi", "mcmi fine-tuning", seed=cfg.seed + 1, epochs=cfg.mcmi.epochs,
                   lr=cfg.lr * cfg.mcmi.lr_scale, batch_fn=batch, schedule=cfg.mcmi.schedule)


class MCMITeacher(DeterministicTeacher):
    kind = Bayes.mcmi
    section = "mcmi"
    takes_base = True

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        teacher, history = super().train(run)
        history["mcmi"] = fine_tune(teacher.model, run)
        teacher.model.eval()
        return teacher, history
