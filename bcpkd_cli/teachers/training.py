"""What a teacher kind trains with: the `TrainingRun` a stage prepares, and the losses and batches of it.

A run holds the recipe, the data (on the training device), the network's spec, the teacher.pt files
it starts from (`teacher.base`, or ensemble members) and one resumable state per training phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bcpkd_cli import artifacts
from bcpkd_cli.choices import Bayes, Schedule
from bcpkd_cli.config import Recipe
from bcpkd_cli.console import TrainingReport, console, line
from bcpkd_cli.data import Dataset, views
from bcpkd_cli.engine import BatchFn, LossFn, TrainSpec, prepare_for_device, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, settle_pretrained
from bcpkd_cli.resumption import Resume
from bcpkd_cli.steps import HeldoutCurve, LogPlan, log_plan


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, _targets) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def random_views(data: Dataset, seed: int) -> BatchFn:
    """Batches of a random view (of all 162 of each image: data.crop) of every image, drawn anew every epoch."""
    sampler = views.ViewSampler(len(data.train), views.N_VIEWS, seed)
    view_space = data.views

    def batch(rows: torch.Tensor, epoch: int):
        return view_space.apply(data.train.inputs[rows], rows, sampler.slots(rows, epoch)), None

    return batch


def load_single_network(path: str, option: str, data_fingerprint: str, kinds: tuple[Bayes, ...]) -> dict:
    """The checkpoint of an existing single-network teacher (a base, or an ensemble member)."""
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    if Bayes(payload["bayes"]) not in kinds:
        raise BcpkdError(f"{option} {path}: is a {payload['bayes']} teacher; give a teacher.pt of kind "
                         f"{' or '.join(k.value for k in kinds)}")
    if payload["data"]["fingerprint"] != data_fingerprint:
        console.print(f"[yellow]warning:[/] {path} was trained on other data "
                      f"({payload['data']['fingerprint']}); using it on {data_fingerprint}")
    return payload


@dataclass(frozen=True)
class TrainingRun:
    """Everything a kind's `train` needs. `starts` are the payloads of the teacher.pt files the kind
    starts from (teacher.base, or an ensemble's members); `phase(name)` is the resumable state of one
    training phase (the network, an ensemble member, MCMI fine-tuning); `logs` collects each phase's held-out
    curve (as a student's log: {"step", "heldout_nll", "heldout_accuracy"} every teacher.log_every steps)."""

    recipe: Recipe
    data: Dataset
    device: torch.device
    spec: dict
    starts: tuple[dict, ...]
    phase: Callable[[str], Resume]
    folder: Path  # the teacher's run folder (TensorBoard logs go to folder/tensorboard/<phase>)
    init: tuple[str, dict, dict | None] | None = None  # teacher.init: (file name, state dict, bcpkd spec or None)
    logs: dict[str, list[dict]] = field(default_factory=dict)  # phase -> its log entries (filled by `fit`)
    log_plans: dict[str, LogPlan] = field(default_factory=dict)  # phase -> its held-out curve's plan (by `fit`)
    pretrained: set[str] = field(default_factory=set)  # what pretrained weights gave its networks (each said once)

    @property
    def base(self) -> dict | None:
        """The payload of teacher.base, if the recipe names one."""
        return self.starts[0] if self.recipe.teacher.base else None

    def network(self, seed: int | None = None) -> nn.Module:
        """A network of the run's spec on the device: seeded, with teacher.base's weights when there is a base, or
        the imported network's (teacher.init)."""
        torch.manual_seed(self.recipe.teacher.seed if seed is None else seed)
        state = self.base["state_dict"] if self.base is not None else None
        model = prepare_for_device(build_model(self.spec, state, self.init), self.device, self.recipe.precision)
        note = settle_pretrained(model, self.data.classes)
        if note and note not in self.pretrained:
            self.pretrained.add(note)
            line(note)
        return model

    def augmented(self, seed: int) -> BatchFn | None:
        """Random views of images when teacher.augment is on (None: the plain training rows)."""
        return random_views(self.data, seed) if self.data.is_image and self.recipe.teacher.augment else None

    def fit(self, model: nn.Module, loss_fn: LossFn, phase: str, desc: str, seed: int | None = None,
            epochs: int | None = None, lr: float | None = None, batch_fn: BatchFn | None = None,
            penalty: Callable[[int], "torch.Tensor | float"] | None = None,
            schedule: Schedule | None = None) -> dict:
        """Train `model` in place with the teacher section's optimiser settings (its schedule unless `schedule` is
        given); optimizer steps and seconds."""
        cfg = self.recipe.teacher
        seed = cfg.seed if seed is None else seed
        spec = TrainSpec(cfg.epochs if epochs is None else epochs, cfg.batch_size, cfg.optimizer,
                         cfg.lr if lr is None else lr, cfg.momentum, cfg.weight_decay, seed, cfg.lr_milestones,
                         self.recipe.precision, self.recipe.compile, schedule or cfg.schedule, cfg.warmup,
                         cfg.accumulate)
        started = time.perf_counter()
        log = self.recipe.log
        report = TrainingReport(desc, line_seconds=log.line_seconds,
                                tensorboard=[self.folder / "tensorboard" / phase] if log.tensorboard else None)
        held = self.data.heldout
        self.logs[phase] = []
        plan = self.log_plans[phase] = log_plan(cfg.log_every, cfg.log_examples, len(self.data.train), len(held),
                                                spec.batch_size, spec.epochs, spec.accumulate)
        steps = train(model, self.data.train.inputs, self.data.train.labels, None, loss_fn, spec, desc=desc,
                      log_every=plan.interval, curve=HeldoutCurve(held.inputs, held.labels, plan.examples),
                      batch_fn=batch_fn or self.augmented(seed), penalty=penalty, resume=self.phase(phase),
                      report=report, log=self.logs[phase])
        return {"steps": steps, "seconds": round(time.perf_counter() - started, 2)}

    def fit_unless_base(self, model: nn.Module, loss_fn: LossFn, desc: str) -> dict:
        """Train the network, or keep teacher.base's weights (and its history and log) when there is a base."""
        if self.base is not None:
            self.logs["teacher"] = list(self.base.get("log", []))
            return dict(self.base["history"])
        return self.fit(model, loss_fn, "teacher", desc)
