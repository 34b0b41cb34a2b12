"""A plain network as teacher: softmax(logits / temperature)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bcpkd_cli.engine import predict_logits


class DeterministicTeacher:
    """Predictive probabilities of one network; `calibration_temperature` is the fitted T_cal."""

    def __init__(self, model: nn.Module, calibration_temperature: float = 1.0, batch_size: int = 4096):
        self.model = model
        self.calibration_temperature = calibration_temperature
        self.batch_size = batch_size

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the network once; return temperature -> probabilities [B, C] (logits / (T_cal * T))."""
        logits = predict_logits(self.model, inputs, self.batch_size)
        return lambda temperature: torch.softmax(logits / (self.calibration_temperature * temperature), dim=1)

    def predict_probs(self, inputs: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """inputs [B, ...], example indices [B] -> probabilities [B, C]."""
        return self.predictive_at(inputs, index)(temperature)

    def posterior_state(self) -> None:
        return None

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature}
