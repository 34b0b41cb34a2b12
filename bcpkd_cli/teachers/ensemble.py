"""Deep ensemble: M networks of one architecture, their softmax outputs averaged."""

from __future__ import annotations

import torch
from torch import nn

from bcpkd_cli.teachers.sampled import SampledTeacher


class EnsembleTeacher(SampledTeacher):
    """`members[0]` is the checkpoint's main network; the others are its posterior state."""

    def __init__(self, members: list[nn.Module], calibration_temperature: float = 1.0, batch_size: int = 1024):
        super().__init__(members[0], calibration_temperature, 0, batch_size)
        self.members = [m.eval() for m in members]

    def sample_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(inputs) for member in self.members])  # [M, B, C]

    def posterior_state(self) -> dict:
        return {"members": [member.state_dict() for member in self.members[1:]]}

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature, "members": len(self.members)}
