"""Teachers whose predictive averages S networks: weight samples (VI), dropout masks, ensemble members.

predictive(x, T) = mean over s of softmax(logits_s(x) / (T_cal * T)); the draws behind logits_s are
pure functions of (seed, s) or (seed, s, example index), so a cache does not depend on batch layout.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bcpkd_cli.teachers.base import Teacher


class SampledTeacher(Teacher):
    """Base of the averaging kinds: subclasses implement `sample_logits(inputs, index) -> [S, B, C]`."""

    def __init__(self, model: nn.Module, calibration_temperature: float = 1.0, noise_seed: int = 0,
                 batch_size: int = 1024):
        super().__init__(model.eval(), calibration_temperature, noise_seed, batch_size)

    def sample_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """inputs [B, ...] (one chunk), example indices [B] -> logits of the S networks [S, B, C]."""
        raise NotImplementedError

    def all_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits [S, N, C] of all inputs, chunk by chunk."""
        return torch.cat([self.sample_logits(inputs[i:i + self.batch_size], index[i:i + self.batch_size])
                          for i in range(0, len(inputs), self.batch_size)], dim=1)

    @torch.inference_mode()
    def draws_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the S networks once; return temperature -> each network's probabilities [S, B, C]."""
        logits = self.all_logits(inputs, index)  # [S, B, C]
        return lambda temperature: torch.softmax(logits / (self.calibration_temperature * temperature), dim=2)

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the S networks once; return temperature -> probabilities [B, C], the mean over the S networks."""
        draws = self.draws_at(inputs, index)
        return lambda temperature: draws(temperature).mean(dim=0)

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature, "noise_seed": self.noise_seed}
