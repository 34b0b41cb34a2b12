"""What a student trains against, in one place: `student_targets` picks the source from distill.targets.

- teacher: the teacher's cached BCPs [N, V, C] (found, given with --cache, or built now), one row per
  example and view;
- online: the calibrated teacher that made that cache, run on every batch at T_t;
- onehot: the labels; true: the exact BCPs (synthetic data); noisy: one Dirichlet(alpha P) draw of them.

Every source answers the same two questions: the targets [B, C] of a batch (each example's drawn view),
and the targets [K, C] of unaugmented examples (view 0, for the gradient noise).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import (at_temperature, cache_expectations, cache_view_ids, ensure_cache, ensure_calibrated,
                                   temper)
from bcpkd_cli.choices import Targets, Temper
from bcpkd_cli.config import CalibrateConfig, Recipe
from bcpkd_cli.console import console
from bcpkd_cli.data import Dataset, views
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.teachers import Teacher, load_teacher
from bcpkd_cli.tuning import describe_tuning


def onehot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """labels [N] -> one-hot probabilities [N, C]."""
    return torch.nn.functional.one_hot(labels, n_classes).float()


def dirichlet_noised(bcp: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """One draw of Dirichlet(alpha * P) per row of bcp [N, C], seeded; the draws' mean is P.

    Each component's variance is P_k (1 - P_k) / (alpha + 1): the noise of a BCP estimate.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        concentration = (alpha * bcp.double()).clamp_min(1e-8)
        return torch.distributions.Dirichlet(concentration).sample().float()


# One teacher pass per batch for every student of a lockstep group: teacher id -> (T -> probabilities [B, C])
Predictives = dict[int, Callable[[float], torch.Tensor]]


class TargetSource(ABC):
    """A student's targets; `provenance` goes into its checkpoint."""

    provenance: dict

    @abstractmethod
    def batch(self, rows: torch.Tensor, slots: torch.Tensor, epoch: int, inputs: torch.Tensor,
              sample_index: Callable[[], torch.Tensor], predictives: Predictives) -> torch.Tensor:
        """Targets [B, C] of training rows [B] seen in view slots [B] in `epoch` (the batch `inputs`, whose Monte
        Carlo draws are seeded by `sample_index()` [B]); `predictives` is shared by the students of one batch."""

    @abstractmethod
    def view_zero(self, inputs: torch.Tensor, sample_index: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """Targets [K, C] of the unaugmented training rows `rows` [K] (default: all) (inputs [K, ...]: theirs;
        sample_index [K]: what seeds their Monte Carlo draws)."""

    def subset(self, rows: torch.Tensor) -> TargetSource:
        """The source for the training rows `rows` only (few-shot students)."""
        return self


def draw_weights(n_examples: int, n_draws: int, mode: str, seed: int, epoch: int) -> torch.Tensor:
    """How much each of an example's K cached draws weighs in its target this epoch -> [N, K], rows summing to 1:
    `mean` 1/K each; `one` a single seeded draw; a number k: k distinct seeded draws, 1/k each."""
    if mode == "mean":
        return torch.full((n_examples, n_draws), 1.0 / n_draws)
    k = 1 if mode == "one" else int(mode)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)  # apart from the view draws
    chosen = torch.rand(n_examples, n_draws, generator=generator).argsort(dim=1)[:, :k]
    return torch.zeros(n_examples, n_draws).scatter_(1, chosen, 1.0 / k)


class TableTargets(TargetSource):
    """Fixed rows probs [N, V, C] (V = 1 unless cached per view): a cache, kept memory-mapped on the CPU in its
    stored dtype (copied to a GPU once), or one-hot, true or noisy BCPs. A cache with K Monte Carlo draws,
    [N, V, K, C], gives each example the draws `draw` picks (`draw_weights`, seeded by `seed` and the epoch)."""

    def __init__(self, probs: torch.Tensor, provenance: dict | None = None, draw: str = "mean", seed: int = 0):
        self.probs = probs
        self.provenance = provenance or {}
        self.draw, self.seed = draw, seed
        self._epoch, self._weights = -1, torch.empty(0)

    def batch(self, rows, slots, epoch, inputs, sample_index, predictives) -> torch.Tensor:
        picked = self.probs[rows, slots if self.probs.shape[1] > 1 else 0].float()  # a float16 cache too
        if picked.ndim == 2:
            return picked  # [B, C]
        if epoch != self._epoch:  # once per epoch, on the cache's device (not per batch)
            self._epoch = epoch
            self._weights = draw_weights(len(self.probs), self.probs.shape[2], self.draw, self.seed,
                                         epoch).to(picked.device)
        weights = self._weights[rows]  # [B, K]
        return (weights[:, :, None] * picked).sum(dim=1)  # [B, C]

    def view_zero(self, inputs, sample_index, rows=None) -> torch.Tensor:
        """Unaugmented targets [K, C]; with draws, their mean (the target the draws estimate)."""
        zero = (self.probs[:, 0] if rows is None else self.probs[rows.to(self.probs.device), 0]).float()
        return zero.mean(dim=1) if zero.ndim == 3 else zero

    def subset(self, rows: torch.Tensor) -> TargetSource:
        return TableTargets(self.probs[rows.to(self.probs.device)], self.provenance, self.draw, self.seed)


class OnlineTargets(TargetSource):
    """The calibrated teacher run on every batch at T_t (the reference the cache is compared with)."""

    def __init__(self, teacher: Teacher, t_teacher: float, provenance: dict, mode: Temper = Temper.logits):
        self.teacher, self.t_teacher, self.provenance, self.mode = teacher, t_teacher, provenance, mode

    def batch(self, rows, slots, epoch, inputs, sample_index, predictives) -> torch.Tensor:
        key = id(self.teacher)
        if key not in predictives:
            predictives[key] = self.teacher.predictive_at(inputs, sample_index())
        return at_temperature(predictives[key], self.t_teacher, self.mode)

    def view_zero(self, inputs, sample_index, rows=None) -> torch.Tensor:
        return at_temperature(self.teacher.predictive_at(inputs, sample_index), self.t_teacher, self.mode)


def _teacher_payload(recipe: Recipe, data: Dataset, teacher_path: Path | None) -> dict:
    if teacher_path is None:
        raise BcpkdError(f"distill --targets {recipe.distill.targets.value} needs --teacher TEACHER.pt "
                         f"(or choose --targets onehot|true|noisy)")
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
    if payload["data"]["fingerprint"] != data.fingerprint:
        console.print(f"[yellow]warning:[/] {teacher_path} was trained on data {payload['data']['fingerprint']}, "
                      f"the student trains on {data.fingerprint}")
    return payload


def _calibrated_teacher(recipe: Recipe, data: Dataset, teacher_path: Path | None,
                        device: torch.device) -> tuple[Path, dict]:
    """The calibrated teacher that `--targets online` runs (found, or calibrated now; no cache is built) and the
    teacher's provenance."""
    payload = _teacher_payload(recipe, data, teacher_path)
    calibrated = ensure_calibrated(teacher_path, payload, data, recipe.calibrate, recipe.distill.t_teacher, device,
                                   n_bins=recipe.evaluate.ece_bins)
    report = calibrated.parent / "report.json"
    tuned = json.loads(report.read_text()) if report.is_file() else {}
    return calibrated, {"teacher": str(Path(teacher_path).resolve()), "teacher_kind": payload["bayes"],
                        "teacher_sha256": artifacts.sha256_file(teacher_path),
                        "calibrated_teacher": str(calibrated), "calibrated_teacher_sha256": artifacts.sha256_file(calibrated),
                        "calibration": {k: tuned[k] for k in ("prior_precision", "temperature") if k in tuned}}


def _teacher_cache(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                   device: torch.device) -> tuple[Path, dict]:
    """The BCP cache for this teacher (found, given, or built now) and the teacher's provenance."""
    payload = _teacher_payload(recipe, data, teacher_path)
    if cache is None:
        cache, built = ensure_cache(teacher_path, payload, data, recipe.calibrate, recipe.distill.t_teacher, device,
                                    n_bins=recipe.evaluate.ece_bins)
        console.print(f"{'built' if built else 'using'} BCP cache {cache}")
        tuned = describe_tuning(json.loads((cache.parent / "report.json").read_text())) if built else None
        if tuned:
            console.print(tuned)
    report = Path(cache).parent / "report.json"  # what calibration tuned, next to a cache that calibrate built
    tuned = json.loads(report.read_text()) if report.is_file() else {}
    info = {"teacher": str(Path(teacher_path).resolve()), "teacher_kind": payload["bayes"],
            "teacher_sha256": artifacts.sha256_file(teacher_path), "cache": str(Path(cache).resolve()),
            "cache_sha256": artifacts.sha256_file(cache),
            "calibration": {k: tuned[k] for k in ("prior_precision", "temperature") if k in tuned}}
    calibrated = Path(cache).parent / "teacher.pt"  # the calibrated teacher whose predictive the cache holds
    if calibrated.is_file():
        info |= {"calibrated_teacher": str(calibrated.resolve()),
                 "calibrated_teacher_sha256": artifacts.sha256_file(calibrated)}
    return Path(cache), info


def student_targets(recipe: Recipe, data: Dataset, teacher_path: Path | None, cache: Path | None,
                    device: torch.device, online: dict[str, Teacher]) -> TargetSource:
    """The source of a student's targets at T_t for the training split. `online` keeps one teacher object
    per calibrated teacher file, shared by the students of a group."""
    cfg, train_split = recipe.distill, data.train
    if cfg.targets == Targets.online:  # the calibrated teacher (no cache), run on every batch
        calibrated, info = _calibrated_teacher(recipe, data, teacher_path, device)
        key = info["calibrated_teacher_sha256"]  # equal calibrations (say, for other T_t) share one teacher
        if key not in online:
            online[key] = load_teacher(artifacts.load_checkpoint(calibrated, artifacts.TEACHER_FORMAT), device)
        return OnlineTargets(online[key], cfg.t_teacher, info, recipe.calibrate.temper)
    if cfg.targets == Targets.teacher:
        cache, info = _teacher_cache(recipe, data, teacher_path, cache, device)
        expect = cache_expectations(teacher_path, data, cfg.t_teacher, recipe.calibrate)
        probs, _ = artifacts.load_cache(cache, expect)  # memory-mapped; on CUDA copied to the device once
        if cfg.draw != "mean" and probs.ndim == 3:
            raise BcpkdError(f"distill.draw={cfg.draw}: the cache {cache} keeps no Monte Carlo draws; build one with "
                             f"--set calibrate.draws=K")
        return TableTargets(probs if device.type == "cpu" else probs.to(device), info, cfg.draw,
                            cfg.data_seed if cfg.data_seed >= 0 else cfg.seed)
    if cfg.targets == Targets.onehot:
        return TableTargets(onehot(train_split.labels, data.n_classes)[:, None, :])
    if train_split.true_bcp is None:
        raise BcpkdError(f"--targets {cfg.targets.value}: dataset {recipe.data.name.value} has no true BCPs; "
                         f"use --targets teacher or onehot")
    if cfg.targets == Targets.true:
        return TableTargets(temper(train_split.true_bcp, cfg.t_teacher)[:, None, :])
    noisy = dirichlet_noised(train_split.true_bcp.cpu(), cfg.dirichlet_alpha, cfg.seed).to(device)
    return TableTargets(temper(noisy, cfg.t_teacher)[:, None, :], {"dirichlet_alpha": cfg.dirichlet_alpha})


def view_batches(data: Dataset, calibrate_cfg: CalibrateConfig, seed: int, sources: list[TargetSource],
                 device: torch.device, example_index: torch.Tensor):
    """group_batch_fn(rows, epoch): each example's view of the epoch (drawn once for all students) and
    every student's exact target for it (design.md sec. 2). `example_index` [N] maps rows to the
    training split's example ids (they seed MC draws); an online teacher shared by several students
    (at any T_t) runs once per batch."""
    view_ids = cache_view_ids(data, calibrate_cfg).to(device)  # [V]
    sampler = views.ViewSampler(len(data.train), len(view_ids), seed)
    train_inputs = data.train.inputs
    examples_on_device = example_index.to(device)  # no copy back from the device per step
    view_space = data.views

    def batch(rows: torch.Tensor, epoch: int):
        if len(rows) == 0:  # a torchrun process's share of a last batch smaller than the process count
            return train_inputs[rows], [torch.zeros(0, data.n_classes, device=device) for _ in sources]
        slots = sampler.slots(rows, epoch)  # [B] columns of the [N, V, C] cache
        ids = view_ids[slots]
        examples = examples_on_device[rows]  # [B] ids in the training split: the cache's rows
        inputs = view_space.apply(train_inputs[rows], examples, ids) if data.is_image else train_inputs[rows]

        def sample_index() -> torch.Tensor:  # only online teachers need it (it reads the ids on the CPU)
            return views.sample_index(examples, ids)

        predictives: Predictives = {}
        return inputs, [source.batch(rows, slots, epoch, inputs, sample_index, predictives) for source in sources]

    return batch
