"""The MSE teacher (kind `mse`): trained on the squared error of its logits to the one-hot labels,
whose minimiser is E[onehot(y) | x], the Bayes class probabilities themselves."""

from __future__ import annotations

from typing import ClassVar

import torch

from bcpkd_cli import losses
from bcpkd_cli.choices import Bayes
from bcpkd_cli.engine import LossFn
from bcpkd_cli.teachers.deterministic import DeterministicTeacher


def mean_squared_error(logits: torch.Tensor, labels: torch.Tensor, _targets) -> torch.Tensor:
    return losses.mse_to_onehot(logits, labels)


class MSETeacher(DeterministicTeacher):
    kind = Bayes.mse
    loss: ClassVar[LossFn] = staticmethod(mean_squared_error)
