"""Temperature scaling (kind `temperature`): a deterministic network whose T_cal is fitted on held-out NLL."""

from __future__ import annotations

import math
from typing import Callable

import torch

from bcpkd_cli import metrics
from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import TeacherConfig
from bcpkd_cli.console import console
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.training import TrainingRun


def fit_temperature(predictive: Callable[[float], torch.Tensor], labels: torch.Tensor,
                    lo: float = 0.05, hi: float = 20.0, iters: int = 60) -> float:
    """Temperature minimising held-out NLL, by golden-section search over log T in [lo, hi]. An optimum at an
    edge of the interval is not trusted: the interval widens on that side (with a warning) and the search
    runs again, at most 4 times."""
    for _ in range(4):
        t = _golden_section(predictive, labels, lo, hi, iters)
        edge = 0.01 * math.log(hi / lo)  # within 1% of the interval's length from an end
        if math.log(hi / t) < edge:
            lo, hi = lo, hi * hi / lo
        elif math.log(t / lo) < edge:
            lo, hi = lo * lo / hi, hi
        else:
            return t
        console.print(f"[yellow]warning:[/] the best temperature lies at an edge of the search ({t:.3g}); "
                      f"searching {lo:.3g} .. {hi:.3g}")
    return _golden_section(predictive, labels, lo, hi, iters)


def _golden_section(predictive: Callable[[float], torch.Tensor], labels: torch.Tensor, lo: float, hi: float,
                    iters: int) -> float:
    def loss(log_t: float) -> float:
        return metrics.nll(predictive(math.exp(log_t)), labels)

    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2.0)


class TemperatureTeacher(DeterministicTeacher):
    """Cross-entropy training (or teacher.base), then T_cal minimising held-out NLL."""

    kind = Bayes.temperature
    takes_base = True

    @classmethod
    def needs_heldout(cls, cfg: TeacherConfig) -> bool:
        return True

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        teacher, history = super().train(run)
        held = run.data.heldout
        teacher.calibration_temperature = fit_temperature(
            teacher.predictive_at(held.inputs, torch.arange(len(held))), held.labels)
        history["temperature"] = teacher.calibration_temperature
        return teacher, history
