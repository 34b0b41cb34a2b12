"""A plain network as teacher (kind `none`): softmax(logits / (T_cal * T)), trained with cross-entropy.

The other single-network kinds (temperature, mse, mcmi) subclass it: they differ only in how the
network is trained or calibrated.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from bcpkd_cli.choices import Bayes, teacher_label
from bcpkd_cli.config import TeacherConfig
from bcpkd_cli.engine import LossFn
from bcpkd_cli.models import build_model, predict_logits
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deployed import Deployed, Tempered, check_draws
from bcpkd_cli.teachers.training import TrainingRun, cross_entropy


class DeterministicTeacher(Teacher):
    """Predictive probabilities of one network; `calibration_temperature` is the fitted T_cal."""

    kind = Bayes.none
    loss: ClassVar[LossFn] = staticmethod(cross_entropy)

    def __init__(self, model: nn.Module, calibration_temperature: float = 1.0, batch_size: int = 4096):
        super().__init__(model, calibration_temperature, batch_size=batch_size)

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        model = run.network()
        history = run.fit_unless_base(model, cls.loss, teacher_label(cls.kind))
        return cls(model.eval()), history

    @classmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        model = build_model(payload["model"], payload["state_dict"]).to(device).eval()
        return cls(model, payload["predictive"]["calibration_temperature"])

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the network once; return temperature -> probabilities [B, C] (logits / (T_cal * T))."""
        logits = predict_logits(self.model, inputs, self.batch_size)
        return lambda temperature: torch.softmax(logits / (self.calibration_temperature * temperature), dim=1)

    def deployable(self, draws: int = 0) -> Deployed:
        """The network's logits / T_cal: the predictive itself."""
        check_draws(draws, self.kind, takes_draws=False)
        t = self.calibration_temperature
        return Deployed(Tempered(self.model, t), f"softmax(logits / T_cal), T_cal {t:.3f}", exact=True, epistemic=None)
