"""A teacher's predictive as one deployable graph (`Teacher.deployable`).

The module is a plain eval-mode nn.Module that torch.export and the ONNX exporter trace with a dynamic batch
dimension: inputs [B, ...], as the teacher's network takes them -> (logits [B, C], probs [B, C]) or
(logits, probs, epistemic [B]), with softmax(logits) == probs. Everything the predictive needs besides the
networks (posterior factors, dropout masks, weight samples) is fixed when it is built; the networks are copies,
so the module does not change with the teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from bcpkd_cli.choices import Bayes
from bcpkd_cli.errors import BcpkdError

DRAW_KINDS = "vi and mc-dropout"  # the kinds whose deployable takes --draws


@dataclass(frozen=True)
class Deployed:
    """A teacher as one graph, and what it computes."""

    module: nn.Module  # inputs [B, ...] -> (logits [B, C], probs [B, C]) or (logits, probs, epistemic [B])
    predictive: str  # one line saying exactly what the module computes
    exact: bool  # probs equal the teacher's own predictive (predict_probs at T=1) up to float rounding
    epistemic: str | None  # the third output's name ("logit_variance", "mutual_information"); None: none

    def __post_init__(self):
        self.module.eval().requires_grad_(False)  # for inference only: its networks are copies


def check_draws(draws: int, kind: Bayes, takes_draws: bool) -> None:
    """Refuse a draw count the kind cannot honour."""
    if draws < 0:
        raise BcpkdError(f"--draws {draws}: give a number of fixed draws, or 0 for the mean network")
    if draws and not takes_draws:
        raise BcpkdError(f"--draws {draws}: only {DRAW_KINDS} teachers deploy as fixed draws, not a {kind.value} one; "
                         f"leave --draws out")


def snapshot(network: nn.Module) -> nn.Module:
    """An eval-mode copy of a network whose head is a plain copy of its Linear (laplace-torch leaves a feature hook
    on the original's)."""
    network = copy.deepcopy(network).eval()
    head = network.head
    network.head = nn.Linear(head.in_features, head.out_features, head.bias is not None,
                             device=head.weight.device, dtype=head.weight.dtype)
    network.head.load_state_dict(head.state_dict())
    return network


class Tempered(nn.Module):
    """One network: logits / T_cal and their softmax."""

    def __init__(self, network: nn.Module, temperature: float):
        super().__init__()
        self.network, self.temperature = snapshot(network), temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network(x) / self.temperature  # [B, C]
        return logits, torch.softmax(logits, dim=1)


def mixture(draw_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of K draws [K, B, C] (already divided by T_cal) -> log of the mean softmax [B, C], the mean softmax
    [B, C] and the mutual information H(mean p) - mean H(p_k) [B] (nats)."""
    log_draws = torch.log_softmax(draw_logits, dim=2)  # [K, B, C]
    probs = torch.softmax(draw_logits, dim=2).mean(dim=0)  # [B, C], as the teacher averages
    logits = torch.logsumexp(log_draws, dim=0) - math.log(draw_logits.shape[0])  # log(probs), finite
    entropy = -(probs * logits).sum(dim=1)
    mean_entropy = -(log_draws.exp() * log_draws).sum(dim=2).mean(dim=0)
    return logits, probs, (entropy - mean_entropy).clamp_min(0.0)


class Averaged(nn.Module):
    """K networks (ensemble members, weight samples): the mean of their softmax(logits / T_cal)."""

    def __init__(self, networks: list[nn.Module], temperature: float):
        super().__init__()
        self.networks, self.temperature = nn.ModuleList(snapshot(n) for n in networks), temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mixture(torch.stack([network(x) for network in self.networks]) / self.temperature)  # [K, B, C]
