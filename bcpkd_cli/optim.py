"""Optimisers and learning-rate schedules of the training loops (engine.train_lockstep), and their resumable state.

Schedules count optimizer steps: with gradient accumulation one step takes several batches."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

from bcpkd_cli.choices import Optimizer, Schedule

if TYPE_CHECKING:
    from bcpkd_cli.engine import TrainSpec


def make_optimizer(params, spec: TrainSpec) -> torch.optim.Optimizer:
    """SGD (momentum) and Adam with L2 weight decay on every parameter; AdamW with decoupled weight decay on the
    weights of two or more dimensions only (none on biases and normalisation weights, as transformers are trained)."""
    if spec.optimizer == Optimizer.sgd:
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               foreach=True)  # foreach: one kernel per step for all tensors
    if spec.optimizer == Optimizer.adam:
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, foreach=True)
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, foreach=True)


def per_step(spec: TrainSpec) -> bool:
    """Whether the learning rate moves after every optimizer step (linear, or any schedule with a warm-up) rather
    than after every epoch (step: at lr_milestones; cosine: over the epochs, as torch's MultiStepLR and
    CosineAnnealingLR)."""
    return spec.schedule == Schedule.linear or spec.warmup > 0


def warmup_steps(warmup: float, total: int) -> int:
    """The optimizer steps of the warm-up: `warmup` itself, or for a fraction < 1 that share of all `total` steps
    (rounded up, as transformers' warmup_ratio)."""
    return math.ceil(warmup * total) if warmup < 1 else int(warmup)


def lr_factor(spec: TrainSpec, step: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step` (0, 1, ... total - 1) as a multiple of spec.lr, for a schedule that
    moves every step: a linear warm-up from 0, then step (x0.1 from each of lr_milestones' epochs), linear (down to 0
    at step `total`) or cosine (half a cosine period down to 0 at step `total`), as transformers'
    get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup."""
    warm = warmup_steps(spec.warmup, total)
    if step < warm:
        return float(step) / float(max(1, warm))
    if spec.schedule == Schedule.step:
        epoch = step // max(1, steps_per_epoch)
        return 0.1 ** sum(milestone <= epoch for milestone in spec.lr_milestones)
    if spec.schedule == Schedule.linear:
        return max(0.0, float(total - step) / float(max(1, total - warm)))
    progress = float(step - warm) / float(max(1, total - warm))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_schedule(optimizer: torch.optim.Optimizer, spec: TrainSpec, epochs: int, steps_per_epoch: int) -> LRScheduler:
    """The learning-rate schedule of one network; stepped after every optimizer step where per_step(spec), else
    after every epoch."""
    if per_step(spec):
        total = epochs * steps_per_epoch
        return LambdaLR(optimizer, lambda step: lr_factor(spec, step, total, steps_per_epoch))
    if spec.schedule == Schedule.cosine:
        return CosineAnnealingLR(optimizer, epochs)
    return MultiStepLR(optimizer, list(spec.lr_milestones), gamma=0.1)


def schedule_state(schedule: LRScheduler) -> dict:
    """The schedule's state as plain values (loads with weights_only; LambdaLR keeps no function, only its step)."""
    state = schedule.state_dict()
    if "milestones" in state:  # MultiStepLR's Counter does not load with weights_only
        state = {**state, "milestones": dict(state["milestones"])}
    return state


def restore_schedule(schedule: LRScheduler, state: dict) -> None:
    schedule.load_state_dict({**state, "milestones": Counter(state["milestones"])} if "milestones" in state else state)
